"""`enable_relora` (inject ReLoRA adapters into a built Keras model) and
its inverse, `unload`.

Every change enabling makes to existing objects (a layer's `call`, the
model's `fit` and class, the state attribute) is a patch recorded in the
model's `ReloraState`, so `unload` undoes them all in one loop.
"""

import contextlib

import keras

from keras_relora import _keras_internals
from keras_relora._checks import adapter_args
from keras_relora._checks import bool_arg
from keras_relora._checks import choice_arg
from keras_relora._checks import int_arg
from keras_relora._checks import model_arg
from keras_relora._checks import targets_arg
from keras_relora.adapt import layouts
from keras_relora.adapt import model_class
from keras_relora.adapt import named_adapters
from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.named_adapters import check_adapter_name
from keras_relora.adapt.report import count_base_params
from keras_relora.adapt.report import report
from keras_relora.adapt.state import AdapterGroup
from keras_relora.adapt.state import ReloraState
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state
from keras_relora.adapt.state import holders
from keras_relora.adapt.state import require_state
from keras_relora.adapt.state import set_state
from keras_relora.adapt.train_layers import check_train_layers
from keras_relora.adapt.train_layers import trained_variables
from keras_relora.layers.relora_dense import ReloraDense
from keras_relora.layers.relora_dense import adapter_dtype
from keras_relora.layers.relora_dense import linear_call
from keras_relora.layers.shared_lora_a import SharedLoraA

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
    """Checks the arguments; returns `rank` and the checked `adapter_args`
    (numbers as python ints/floats)."""
    rank = int_arg("rank", rank, 1, "a positive int, e.g. `rank=16`")
    adapter = adapter_args(
        experts, alpha, dropout, router_input, top_k, balance_loss
    )
    choice_arg(
        "share_a",
        share_a,
        SHARE_A,
        "'role' shares one A by every layer of a role (ReLoRA), 'layer' "
        "gives each layer its own A (LoRA, HydraLoRA).",
    )
    bool_arg("train_a", train_a)
    targets_arg(targets)
    return rank, adapter


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
    adapter_name="default",
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
        adapter_name: str. The name of the adapter, a Python identifier.
            On a model that has adapters already, a new name adds another
            adapter with its own settings (rank, experts, targets, ...);
            the first adapter stays active (`keras_relora.set_adapter`
            switches), and `train_layers` stays as the first call set it.
            Defaults to `"default"`.

    Returns:
        A `ReloraReport`: trainable and total parameters, percent of the
        base, per role and per A/B/router. `print()` it for a table.

    Example:

    ```python
    lm = keras_hub.models.Llama3CausalLM.from_preset("llama3_8b_en")
    print(lm.enable_relora(rank=16, experts=4))
    ```
    """
    model_arg(model)
    rank, adapter = _check_args(
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
    check_adapter_name(adapter_name)
    existing = get_state(model)
    if existing is not None and adapter_name in existing.named:
        raise ValueError(
            f"ReLoRA is already enabled on model {model.name!r} with an "
            f"adapter named {adapter_name!r} (adapters: "
            f"{list(existing.named)}). To add another adapter, pass a new "
            "`adapter_name`; to change this one's settings, call "
            "`keras_relora.delete_adapter(model, name)` (or "
            "`keras_relora.unload(model)`) first. "
            f"Received: adapter_name={adapter_name!r}"
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: call it on a batch or "
            "`model.build(input_shape)` before `enable_relora`."
        )
    train_layers = check_train_layers(train_layers)
    root = adapted_model(model)
    _refuse_keras_lora(model, root)
    _refuse_int8_reversible_embedding(model)
    chosen = targets_lib.select(root, targets)
    if existing is None:
        trained = trained_variables(
            model, train_layers, [layer for _, layer, _ in chosen]
        )
        kept = {id(v) for v in trained.values()}
        base_params = count_base_params(model, model.weights)
        frozen = [v for v in model.weights if v.trainable and id(v) not in kept]
    else:
        # A further adapter: the base is frozen and `train_layers` set.
        adapter_ids = {
            id(v)
            for group in existing.named.values()
            for v in group.variables().values()
        }
        base_params = count_base_params(
            model, [v for v in model.weights if id(v) not in adapter_ids]
        )
        train_layers = existing.settings["train_layers"]
        trained, frozen = existing.trained, []
    for variable in frozen:
        variable.trainable = False

    relative = {
        path: targets_lib.relative_path(root, path) for path, _, _ in chosen
    }
    blocks = targets_lib.blocks_of(relative.values())
    block_index = {key: i for i, key in enumerate(blocks)}
    settings = dict(
        rank=rank,
        **adapter,
        targets=[path for path, _, _ in chosen],
        share_a=share_a,
        train_a=train_a,
        train_layers=train_layers,
    )
    group = AdapterGroup(settings, adapters={}, shared_a={}, blocks=blocks)
    if existing is None:
        state = ReloraState(
            settings,
            adapters=group.adapters,
            shared_a=group.shared_a,
            blocks=blocks,
            frozen=frozen,
            trained=trained,
            active=adapter_name,
        )
    else:
        state = existing
    state.named[adapter_name] = group
    for path, layer, role in chosen:
        group.adapters[path] = _inject(
            state,
            group,
            adapter_name,
            layer,
            path,
            role,
            root,
            rank=rank,
            share_a=share_a,
            train_a=train_a,
            block=block_index[targets_lib.block_key(relative[path])],
            layout_map=layout_map,
            **adapter,
        )
    if existing is not None:
        named_adapters.added(model, state, adapter_name)
        return report(model, base_params=base_params)
    set_state(model, state)
    _guard_base_changes(model, state)
    # `fit` keeps a handle on its data (the Reducer's probe reads it).
    guard_fit(model, state)
    model_class.attach(model, state)  # `.keras` files keep the adapters.
    return report(model, base_params=base_params)


def unload(model):
    """Removes the ReLoRA adapters from `model`, in place.

    Undoes `enable_relora`: the adapted layers get their own `call` back,
    their `relora` sub-layers (and the shared `A`s) are removed, the
    variables that `enable_relora` froze are trainable again, and the
    model loses its ReLoRA state (with the Reducer's variables) and saving
    class. The outputs are the base model's again. Compile the model
    again before training it: a model trained before refuses `fit` until
    then (its optimizer was built for the adapters).

    Args:
        model: A `keras.Model` with ReLoRA adapters.

    Returns:
        `model`.

    Example:

    ```python
    keras_relora.unload(backbone)
    backbone.enable_relora(rank=4, experts=2)  # new settings
    ```
    """
    state = require_state(model, "`unload`")
    state.undo_patches()
    named_adapters.remove_selector(state)
    for name in list(state.named):
        named_adapters.remove_layers(state, name)
    for variable in state.frozen:
        variable.trainable = True
    model_class.refresh_torch_parameters(model)
    # Refuse a `fit` with the optimizer compiled for the adapters.
    guard_fit(model)
    return model


def remove_added(model, state, name):
    """Removes adapter `name`, just added by a load that failed: the whole
    ReLoRA state if it is the model's only adapter."""
    if name not in state.named:
        return
    if len(state.named) == 1:
        unload(model)
        return
    if state.active == name:
        other = next(n for n in state.named if n != name)
        named_adapters.set_adapter(model, other)
    named_adapters.delete_adapter(model, name)


def _inject(
    state,
    group,
    adapter_name,
    layer,
    path,
    role,
    root,
    *,
    rank,
    share_a,
    train_a,
    block,
    layout_map,
    **adapter_kwargs,
):
    shared = group.shared_a
    suffix = named_adapters.suffix(adapter_name)
    d_in = ReloraDense.input_size(layer)
    key = f"{role}:{d_in}" if share_a == "role" else path
    if key not in shared:
        name = f"shared_a_{role}" if share_a == "role" else f"lora_a{suffix}"
        scope = f"{root.name}_relora{suffix}" if share_a == "role" else path
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
            role=role,
            block=block,
            name=f"relora{suffix}",
            _injected=True,
            **adapter_kwargs,
        )
    _check_paths(layout_map, laid_out, adapter)
    with _keras_internals.unlocked_tracker(layer):
        setattr(layer, f"relora{suffix}", adapter)
    registry = layer.__dict__.get(named_adapters.REGISTRY)
    if registry is None:
        registry = {}
        state.patch(layer, named_adapters.REGISTRY, registry)
        _patch_call(state, layer)
    registry[adapter_name] = adapter
    return adapter


def _refuse_keras_lora(model, root):
    """Refuses a model with Keras's own LoRA (`enable_lora`) enabled."""
    lora = sorted(
        path
        for path, (layer, _) in targets_lib.candidates(root).items()
        if getattr(layer, "lora_enabled", False)
    )
    if lora:
        raise ValueError(
            f"Model {model.name!r} has Keras's own LoRA enabled on layers "
            f"{lora} (`enable_lora`). `enable_relora` cannot be combined "
            "with it: saving (`save_peft`, adapter files) and "
            "`merge_relora` would drop or misplace Keras's LoRA delta. Use "
            "one of the two: start from a model without `enable_lora` and "
            "call `enable_relora` (the `lora` variant is "
            "`enable_relora(rank, **keras_relora.VARIANTS['lora'])`)."
        )


def _refuse_int8_reversible_embedding(model):
    """Refuses an int8 `ReversibleEmbedding`: its reverse call passes no
    gradient back to its inputs.

    Keras's int8 `ReversibleEmbedding` rounds its inputs to int8 in the
    reverse call (a language model's head) without the straight-through
    gradient that int8 `Dense` and `EinsumDense` have, so the gradient
    that reaches the blocks, and every adapter, is wrong (measured against
    the layer's own dequantized map: relative error ~1 with int8, 2e-7
    with int4).
    """
    for layer in _keras_internals.flatten_layers(model):
        if (
            isinstance(layer, keras.layers.ReversibleEmbedding)
            and getattr(layer, "quantization_mode", None) == "int8"
        ):
            raise ValueError(
                f"Cannot enable ReLoRA on {model.name!r}: its layer "
                f"{layer.name!r} is a `ReversibleEmbedding` quantized to "
                f"int8, and Keras {keras.version()}'s int8 "
                "`ReversibleEmbedding` gives its inputs no gradient when it "
                "runs in reverse (a language model's head), so every "
                "adapter would train on a wrong gradient. Quantize the "
                "model without it: `model.quantize('int8', filters=lambda "
                "layer: not isinstance(layer, "
                "keras.layers.ReversibleEmbedding))`, or use 'int4', whose "
                "gradient is right."
            )


def _guard_base_changes(model, state):
    """Makes `quantize` and Keras's `enable_lora` refuse on the adapted
    model, its layers and its backbone (patches of `state`)."""
    for holder in holders(model):
        if hasattr(holder, "quantize"):
            state.patch(holder, "quantize", _refuse_quantize(holder))
        if hasattr(holder, "enable_lora"):
            state.patch(holder, "enable_lora", _refuse_enable_lora(holder))
    for layer, _ in targets_lib.candidates(adapted_model(model)).values():
        if hasattr(layer, "enable_lora"):
            state.patch(layer, "enable_lora", _refuse_enable_lora(layer))
    for adapter in state.adapters.values():
        layer = adapter._base_layer
        state.patch(layer, "quantize", _refuse_quantize(layer))


def _refuse_quantize(obj):
    def quantize(mode=None, *args, **kwargs):
        raise ValueError(
            f"Cannot quantize {obj.name!r} after `enable_relora`: Keras "
            "quantizes leaf layers only, and the adapted layers hold their "
            "adapters, so their base would stay in float (silently). "
            "Quantize first, then enable the adapters: "
            "`keras_relora.unload(model)`, `model.quantize(mode)`, then "
            "`model.enable_relora(...)` (and `load_relora_weights` to "
            f"restore trained adapters). Received: mode={mode!r}"
        )

    return quantize


def _refuse_enable_lora(obj):
    def enable_lora(*args, **kwargs):
        raise ValueError(
            f"Cannot call Keras's `enable_lora` on {obj.name!r}: the model "
            "has ReLoRA adapters (`enable_relora`), and the two cannot be "
            "combined (saving and `merge_relora` would drop or misplace "
            "Keras's LoRA delta). Use the adapters `enable_relora` added "
            "(the `lora` variant: `enable_relora(rank, "
            "**keras_relora.VARIANTS['lora'])`), or call "
            "`keras_relora.unload(model)` first to use `enable_lora` alone."
        )

    return enable_lora


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


def _patch_call(state, layer):
    """Makes `layer`'s own call return its output plus its adapters'.

    The layer object stays where it is (in a functional graph, in a
    keras-hub block), so every caller goes through the adapters (those
    in the layer's registry, `named_adapters.adapters_call`).
    """
    for method in ("call", "quantized_call"):
        original = getattr(layer, method)

        def patched(inputs, *args, _original=original, **kwargs):
            base = linear_call(layer, _original, inputs, *args, **kwargs)
            return named_adapters.adapters_call(
                state, layer, inputs, base, kwargs.get("training")
            )

        state.patch(layer, method, patched)


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
        if state is not None:
            named_adapters.before_fit(model, state)
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
    if state is None:
        _keras_internals.set_untracked(model, "fit", guarded_fit)
    else:
        state.patch(model, "fit", guarded_fit)


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
