"""`enable_relora`: inject ReLoRA adapters into a built Keras model."""

import contextlib

import keras

from keras_relora import _keras_internals
from keras_relora.adapt import layouts
from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.report import ReloraReport
from keras_relora.adapt.state import ENABLE_HOOKS
from keras_relora.adapt.state import ReloraState
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state
from keras_relora.adapt.state import require_state
from keras_relora.adapt.state import set_state
from keras_relora.adapt.train_layers import check_train_layers
from keras_relora.adapt.train_layers import trained_variables
from keras_relora.layers.relora_dense import ROUTER_INPUTS
from keras_relora.layers.relora_dense import ReloraDense
from keras_relora.layers.relora_dense import adapter_dtype
from keras_relora.layers.relora_dense import linear_call
from keras_relora.layers.shared_lora_a import SharedLoraA
from keras_relora.layers.shared_lora_a import float_arg
from keras_relora.layers.shared_lora_a import int_arg

SHARE_A = ("role", "layer")


def _check_args(
    rank,
    experts,
    alpha,
    share_a,
    train_a,
    dropout,
    router_input,
    top_k,
    balance_loss,
    targets,
):
    """Checks the arguments; returns the numbers as python ints/floats."""
    rank = int_arg("rank", rank, 1, "a positive int, e.g. `rank=16`")
    experts = int_arg(
        "experts", experts, 1, "an int >= 1 (1 = a single B per layer)"
    )
    if share_a not in SHARE_A:
        raise ValueError(
            f"`share_a` must be one of {SHARE_A}: 'role' shares one A by "
            "every layer of a role (ReLoRA), 'layer' gives each layer its "
            f"own A (LoRA, HydraLoRA). Received: share_a={share_a!r}"
        )
    if not isinstance(train_a, bool):
        raise ValueError(
            f"`train_a` must be a bool. Received: train_a={train_a!r}"
        )
    if router_input not in ROUTER_INPUTS:
        raise ValueError(
            f"`router_input` must be one of {ROUTER_INPUTS}. "
            f"Received: router_input={router_input!r}"
        )
    if top_k is not None:
        top_k = int_arg(
            "top_k", top_k, 1, f"None or an int in [1, experts={experts}]"
        )
        if top_k > experts:
            raise ValueError(
                f"`top_k` must be None or an int in [1, experts={experts}]."
                f" Received: top_k={top_k!r}"
            )
    if alpha is not None:
        alpha = float_arg(
            "alpha",
            alpha,
            "a positive finite float or None (None: `rank`)",
            lambda v: v > 0,
        )
    dropout = float_arg(
        "dropout", dropout, "a float in [0, 1)", lambda v: 0.0 <= v < 1.0
    )
    balance_loss = float_arg(
        "balance_loss",
        balance_loss,
        "a finite float >= 0 (0 disables it)",
        lambda v: v >= 0,
    )
    _check_targets(targets)
    return rank, experts, alpha, dropout, top_k, balance_loss


def _check_targets(targets):
    if targets is None or isinstance(targets, str):
        return
    if isinstance(targets, (list, tuple)) and all(
        isinstance(t, str) for t in targets
    ):
        return
    raise TypeError(
        "`targets` must be None (the family default), a list of role "
        "aliases, layer names or paths (str), or a regex string, e.g. "
        f"`targets=['q', 'v']`. Received: targets={targets!r}"
    )


def enable_relora(
    model,
    rank=16,
    experts=4,
    *,
    alpha=None,
    targets=None,
    share_a="role",
    train_a=True,
    dropout=0.0,
    router_input="projected",
    top_k=None,
    balance_loss=0.0,
    layout_map=None,
    train_layers=None,
):
    """Freezes `model` and adds ReLoRA adapters to its target layers.

    Changes `model` in place: every existing weight is frozen
    (`variable.trainable = False`) except those of `train_layers` (by
    default a keras-hub Task's own head), then each target `Dense` and
    `EinsumDense` gets a `ReloraDense` sub-layer (named `relora`) whose
    output is added to the layer's own, before its activation. Works on
    keras-hub backbones and tasks (a task's backbone is adapted),
    functional, sequential and subclassed models, including layers that
    are nodes of a functional graph, on every backend. Compile the model
    after this call.

    Args:
        model: A built `keras.Model`.
        rank: int. Rank of every adapter. Defaults to `16`.
        experts: int. Number of B experts per layer; `1` drops the router.
            Defaults to `4`.
        alpha: float. The delta is scaled by `alpha / rank`. Defaults to
            `rank`.
        targets: Which layers to adapt: None for the family default (Llama
            and Gemma-style decoders: `q, k, v, up, down`, the paper's
            Table 9; Stable Diffusion 3's MMDiT: `q, k, v, o`; vision and
            text encoders of multimodal models are left out unless named;
            a model with no known roles: every Dense and EinsumDense), a
            list of role aliases (`q, k, v, o, gate, up, down`) or exact
            layer names or paths, or a regex string on layer paths.
        share_a: `"role"` shares one A by all layers of a role across
            blocks (ReLoRA; ShareLoRA with `experts=1`); `"layer"` gives
            each layer its own A (LoRA with `experts=1`, HydraLoRA with
            more). Defaults to `"role"`.
        train_a: bool. `False` freezes A (LoRA-FA). Defaults to `True`.
        dropout: float. Dropout on the adapters' input. Defaults to `0.0`.
        router_input: `"projected"` (route on `x @ A`, the paper's) or
            `"input"` (route on `x`, HydraLoRA's). Defaults to
            `"projected"`.
        top_k: int or None. Keep the `top_k` largest gates. Defaults to
            `None` (dense softmax).
        balance_loss: float. Load-balancing loss coefficient. Defaults to
            `0.0`.
        layout_map: A `keras.distribution.LayoutMap`, for model-parallel
            training (JAX backend): the map of the active
            `keras.distribution.ModelParallel`, e.g. keras-hub's
            `Llama3Backbone.get_layout_map(mesh)`. Before creating the
            adapter variables, `enable_relora` adds an exact entry for each:
            B is sharded along `d_out` like its base kernel's output axis,
            A and the routers are replicated. Defaults to `None` (adapter
            variables get what the active distribution gives their paths:
            replicated under `DataParallel`, and under `ModelParallel` when
            no pattern of its map matches them, as with keras-hub's maps).
        train_layers: Layers that stay trainable in full next to the
            adapters, as PEFT's `modules_to_save`: `None` keeps a keras-hub
            Task's own layers outside its backbone trainable (a
            classifier's head; keras-hub's `enable_lora` does the same),
            and nothing else; a list of layer names or paths keeps those
            trainable; `[]` freezes every layer. Their weights go into
            `save_relora_weights` files and into `merge_relora`'s result.
            Defaults to `None`.

    Returns:
        A `ReloraReport`: trainable and total parameters, percent of the
        base, per role and per A/B/router. `print()` it for a table.

    Example:

    ```python
    lm = keras_hub.models.Llama3CausalLM.from_preset("llama3_8b_en")
    print(lm.enable_relora(rank=16, experts=4))
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model`. "
            f"Received: model of type {type(model).__name__}"
        )
    rank, experts, alpha, dropout, top_k, balance_loss = _check_args(
        rank,
        experts,
        alpha,
        share_a,
        train_a,
        dropout,
        router_input,
        top_k,
        balance_loss,
        targets,
    )
    if layout_map is not None:
        layouts.check_layout_map(layout_map)
    if get_state(model) is not None:
        raise ValueError(
            f"ReLoRA is already enabled on model {model.name!r}. To change "
            "its settings, call `keras_relora.unload(model)` first, or load "
            "a fresh model."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: call it on a batch or "
            "`model.build(input_shape)` before `enable_relora`."
        )
    train_layers = check_train_layers(train_layers)
    root = adapted_model(model)
    chosen = targets_lib.select(root, targets)
    trained = trained_variables(
        model, train_layers, [layer for _, layer, _ in chosen]
    )
    kept = {id(v) for v in trained.values()}
    base_params = sum(_size(v) for v in model.weights)
    frozen = [v for v in model.weights if v.trainable and id(v) not in kept]
    for variable in frozen:
        variable.trainable = False

    relative = {
        path: targets_lib.relative_path(root, path) for path, _, _ in chosen
    }
    blocks = targets_lib.blocks_of(relative.values())
    block_index = {key: i for i, key in enumerate(blocks)}
    shared = {}
    adapters = {}
    for path, layer, role in chosen:
        adapter = _inject(
            layer,
            path,
            role,
            shared,
            root,
            rank=rank,
            share_a=share_a,
            train_a=train_a,
            experts=experts,
            alpha=alpha,
            dropout=dropout,
            router_input=router_input,
            top_k=top_k,
            balance_loss=balance_loss,
            block=block_index[targets_lib.block_key(relative[path])],
            layout_map=layout_map,
        )
        adapters[path] = adapter
    settings = dict(
        rank=rank,
        experts=experts,
        alpha=alpha,
        targets=[path for path, _, _ in chosen],
        share_a=share_a,
        train_a=train_a,
        dropout=dropout,
        router_input=router_input,
        top_k=top_k,
        balance_loss=balance_loss,
        train_layers=train_layers,
    )
    state = ReloraState(settings, adapters, shared, blocks, frozen)
    state.trained = trained  # `{relative path: variable}`, train in full.
    set_state(model, state)
    _record_fit_data(model, state)
    for hook in ENABLE_HOOKS:  # `.keras` files keep the adapters.
        hook(model)
    return report(model, base_params=base_params)


def _size(variable):
    n = 1
    for d in variable.shape:
        n *= int(d)
    return n


def _inject(
    layer,
    path,
    role,
    shared,
    root,
    *,
    rank,
    share_a,
    train_a,
    block,
    layout_map,
    **adapter_kwargs,
):
    d_in = ReloraDense.input_size(layer)
    key = f"{role}:{d_in}" if share_a == "role" else path
    if key not in shared:
        name = f"shared_a_{role}" if share_a == "role" else "lora_a"
        scope = f"{root.name}_relora" if share_a == "role" else path
        if share_a == "role" and any(k.startswith(f"{role}:") for k in shared):
            name = f"{name}_{d_in}"
        laid_out = {f"{scope}/{name}/kernel": (None, None)}
        _register(layout_map, laid_out)
        with _path_scope(scope):
            shared[key] = SharedLoraA(
                d_in,
                rank,
                trainable=train_a,
                name=name,
                dtype=adapter_dtype(layer),
            )
        _check_paths(layout_map, laid_out, shared[key])
    laid_out = {}
    if layout_map is not None:
        laid_out = layouts.adapter_layouts(
            layout_map, layer, path, adapter_kwargs["experts"]
        )
        _register(layout_map, laid_out)
    with _path_scope(path):
        adapter = ReloraDense(
            layer,
            shared[key],
            block=block,
            name="relora",
            _injected=True,
            **adapter_kwargs,
        )
    _check_paths(layout_map, laid_out, adapter)
    adapter.role = role
    with _keras_internals.unlocked_tracker(layer):
        layer.relora = adapter
    _patch_call(layer, adapter)
    return adapter


def _register(layout_map, laid_out):
    if layout_map is not None:
        for variable_path, axes in laid_out.items():
            layouts.register(layout_map, variable_path, axes)


def _check_paths(layout_map, laid_out, layer):
    if layout_map is not None:
        layouts.check_paths(laid_out, layer.weights)


@contextlib.contextmanager
def _path_scope(path):
    """Nested `keras.name_scope`s, one per component of `path`."""
    with contextlib.ExitStack() as stack:
        for name in path.split("/"):
            stack.enter_context(keras.name_scope(name))
        yield


def _patch_call(layer, adapter):
    """Makes `layer`'s own call return its output plus the adapter's.

    The layer object stays where it is (in a functional graph, in a
    keras-hub block), so every caller goes through the adapter.
    """
    for method in ("call", "quantized_call"):
        original = getattr(layer, method)

        def patched(inputs, *args, _original=original, **kwargs):
            base = linear_call(layer, _original, inputs, *args, **kwargs)
            return adapter(inputs, base, training=kwargs.get("training"))

        _keras_internals.set_untracked(layer, method, patched)


def _record_fit_data(model, state):
    """Wraps `model.fit` (on this instance) to keep a handle on its data.

    The wrapper also refuses a `fit` whose compiled optimizer was built for
    another set of trainable variables (see `guard_fit`).
    """
    guard_fit(model, state)


def guard_fit(model, state=None):
    """Wraps `model.fit` on this instance; refuses a stale compile.

    `enable_relora`, `load_relora_weights` (when it enables adapters),
    `prune` and `unload` change the trainable variables; a model compiled
    and trained before keeps an optimizer built for the old set. Keras's
    `fit` then breaks the model on JAX, raises on torch and trains the old
    set on TensorFlow. The wrapper raises a `ValueError` that says to
    compile again, before Keras touches any variable. With `state`, it
    also records the fit data for the Reducer's probe; without (after
    `unload`), it removes itself at the first `fit` that is not refused.
    """
    fit = model.fit
    fit = getattr(fit, "_relora_original", fit)

    def guarded_fit(x=None, y=None, batch_size=None, *args, **kwargs):
        check_compiled_variables(model)
        if state is None:
            if model.__dict__.get("fit") is guarded_fit:
                del model.__dict__["fit"]
        else:
            # Keras holds out the last rows; `validation_data` overrides.
            split = kwargs.get("validation_split", (args[3:4] or [0.0])[0])
            held_out = kwargs.get("validation_data", (args[4:5] or [None])[0])
            state.fit_data = {
                "x": x,
                "y": y,
                "sample_weight": kwargs.get("sample_weight"),
                "batch_size": batch_size,
                "validation_split": split if held_out is None else 0.0,
            }
        return fit(x, y, batch_size, *args, **kwargs)

    guarded_fit.__doc__ = fit.__doc__
    guarded_fit._relora_original = fit
    _keras_internals.set_untracked(model, "fit", guarded_fit)


def check_compiled_variables(model):
    """Raises if `model`'s built optimizer is for other trainable variables."""
    if not getattr(model, "compiled", False):
        return
    built_for = _keras_internals.optimizer_built_for(
        getattr(model, "optimizer", None)
    )
    if built_for is None:
        return
    current = model.trainable_variables
    if {id(v) for v in built_for} != {id(v) for v in current}:
        raise ValueError(
            f"Model {model.name!r} was compiled and trained before its "
            "trainable variables changed (by `enable_relora`, "
            "`load_relora_weights`, `keras_relora.prune` or "
            "`keras_relora.unload`): its optimizer was built for "
            f"{len(built_for)} trainable variables, the model now has "
            f"{len(current)}. Call `model.compile()` again, with a new "
            "optimizer, before `fit`. Nothing was trained; the model is "
            "unchanged."
        )


def unpatch_call(layer):
    for method in ("call", "quantized_call"):
        layer.__dict__.pop(method, None)


def report(model, base_params=None):
    """The `ReloraReport` of an adapted model."""
    state = require_state(model, "`report`")
    return ReloraReport.from_model(model, state, base_params=base_params)
