"""`merge_relora`: fold the adapters into the base kernels of a new model."""

import contextlib
import tempfile

import keras
import numpy as np
from keras import ops

from keras_relora._checks import int_arg
from keras_relora.adapt import named_adapters
from keras_relora.adapt import tied_embeddings
from keras_relora.adapt.model_class import base_class
from keras_relora.adapt.model_class import serialize_as_base
from keras_relora.adapt.state import holders
from keras_relora.adapt.state import patched
from keras_relora.adapt.state import require_state


def merge_relora(
    model,
    calibration_data=None,
    *,
    batch_size=32,
    verbose=True,
    return_error=False,
    adapter_name=None,
):
    """Returns a plain copy of `model` with the adapters folded into `W`.

    Each adapted layer's kernel becomes `W + dW`, with, for a layer with
    shared `A` (`d_in, rank`) and experts `B_i` (`rank, d_out`):

    ```
    dW = (alpha / rank) * A @ sum_i g_i * B_i
    ```

    computed in float32 (then cast to the kernel's dtype: with bfloat16
    kernels, a small `dW` partly rounds away) and checked for NaN and Inf.
    With `experts=1`, `g_1 = 1` and the merge is exact: the merged model
    gives the adapted model's outputs to float32 rounding.
    With routed experts the gates `g_i` depend on the input, so no single
    `dW` is exact: `calibration_data` is then required, and `g_i` is the
    mean gate of expert `i` over it (over the tokens of the padding mask
    when the inputs have a `"padding_mask"`). The output error of the
    merged model against the live adapters on that data is measured,
    printed when `verbose`, and returned with `return_error=True`.
    Pruned adapters contribute nothing.

    `model` is not changed: the result is a new model of the original
    classes (rebuilt from the base config), holding no keras_relora layer
    or variable, that saves as `.keras` and, for keras-hub models, with
    `save_to_preset`. It is not compiled.

    Named adapters: one adapter is merged, the active one or
    `adapter_name`, and the result holds no other (as PEFT's
    `merge_and_unload`, which merges the active adapter and drops the
    others); `model` keeps all of them, with the same one active. To
    serve several, merge each into its own copy, or keep them live
    (`keras_relora.set_adapter`, `keras_relora.route_examples`).

    Args:
        model: A `keras.Model` with ReLoRA adapters.
        calibration_data: Inputs for the mean gates of routed experts: what
            `model(...)` takes (an array or a dict of arrays), split into
            batches of `batch_size`, or an iterable of such batches (e.g. a
            `tf.data.Dataset`); of `(x, y, ...)` tuples, `x` is used.
            Required when `experts > 1`, optional otherwise (the merge
            error is then measured on it). Defaults to `None`.
        batch_size: int. Batch size for array or dict data. Defaults to
            `32`.
        verbose: bool. Print the measured error. Defaults to `True`.
        return_error: bool. Also return the error dict. Defaults to
            `False`.
        adapter_name: str or None. The named adapter to merge, one of
            `keras_relora.adapter_names(model)`. Defaults to `None` (the
            active adapter).

    Returns:
        The merged `keras.Model`, or `(merged, error)` with
        `return_error=True`, where `error` is `None` without calibration
        data and otherwise a dict with `max_abs` (largest absolute output
        difference), `relative` (`||y_merged - y_live|| / ||y_live||`) and
        `samples` (calibration examples seen).

    Example:

    ```python
    lm.enable_relora(rank=16, experts=1)
    lm.fit(...)
    merged = keras_relora.merge_relora(lm)   # exact, plain Llama3CausalLM
    merged.save("merged.keras")
    ```
    """
    state = require_state(model, "`merge_relora`")
    batch_size = int_arg("batch_size", batch_size, 1, "a positive int")
    name = named_adapters.resolve_name(state, adapter_name, "`merge_relora`")
    with named_adapters.selected(model, name):
        return _merge(
            model, state, calibration_data, batch_size, verbose, return_error
        )


def _merge(model, state, calibration_data, batch_size, verbose, return_error):
    _check_float_base(state)
    routed = {
        path: adapter
        for path, adapter in state.adapters.items()
        if adapter.experts > 1 and not adapter.pruned
    }
    batches = None
    if calibration_data is not None:
        batches = _batches(calibration_data, batch_size)
        if not batches:
            raise ValueError(
                "`calibration_data` holds no batch. Pass inputs for the "
                "model, e.g. a dict of arrays or a `tf.data.Dataset`."
            )
    elif routed:
        raise ValueError(
            "`merge_relora` needs `calibration_data` for routed experts "
            f"(experts={state.settings['experts']}): each token's gates "
            "mix the experts differently, so no single `W + dW` equals "
            "the adapted model. Options: pass `calibration_data` (inputs "
            "like your serving data) to merge with the mean gates over it "
            "and get the measured output error; serve the live adapters "
            "instead (`model.export(...)` keeps the router, "
            "`model.save_relora_weights(...)` keeps the adapters); or "
            "train with `experts=1`, which merges exactly."
        )
    gates = _mean_gates(model, routed, batches) if routed else {}
    merged = _rebuild_base(model)
    _copy_weights(model, merged, state, gates)
    _copy_tokenizer_assets(model, merged)
    error = None
    if batches is not None:
        error = _measure(model, merged, batches)
        if verbose:
            how = "mean gates" if routed else "exact merge"
            print(
                f"merge_relora ({how}): output error on "
                f"{error['samples']} calibration samples: relative "
                f"{error['relative']:.3g}, max abs {error['max_abs']:.3g}"
            )
    if return_error:
        return merged, error
    return merged


def _check_float_base(state):
    quantized = [
        path
        for path, adapter in state.adapters.items()
        if getattr(adapter._base_layer.dtype_policy, "quantization_mode", None)
    ]
    if quantized:
        raise ValueError(
            "`merge_relora` cannot fold adapters into quantized kernels "
            f"(layers {quantized}): `W + dW` would have to be quantized "
            "again, losing most of the small `dW`. Merge on the float "
            "base and quantize the result: load the float model, "
            "`load_relora_weights(...)`, `merged = merge_relora(model)`, "
            "then `merged.quantize('int8')`. Or serve the quantized base "
            "with live adapters."
        )


def _batches(data, batch_size):
    """A list of model inputs from `calibration_data`."""

    def first(element):
        if isinstance(element, tuple):
            return element[0]
        return element

    if isinstance(data, dict) or hasattr(data, "shape"):
        size = len(next(iter(keras.tree.flatten(data))))
        return [
            keras.tree.map_structure(lambda a, i=i: a[i : i + batch_size], data)
            for i in range(0, size, batch_size)
        ]
    if isinstance(data, tuple):
        return _batches(data[0], batch_size)
    return [first(element) for element in data]


def _mask_of(x, shape):
    """The padding mask of `x` if it matches the gates' leading shape."""
    if isinstance(x, dict) and "padding_mask" in x:
        mask = ops.convert_to_numpy(x["padding_mask"]).astype("float32")
        if mask.shape == tuple(shape[: mask.ndim]):
            return mask
    return None


def _mean_gates(model, routed, batches):
    """`{path: (experts,)}` mean gates of the routed adapters."""
    sums = {path: 0.0 for path in routed}
    counts = {path: 0.0 for path in routed}
    current = {}

    def recording(path, adapter):
        gates_fn = adapter.gates

        def gates(inputs, h=None):
            g = gates_fn(inputs, h)
            values = ops.convert_to_numpy(ops.cast(g, "float32"))
            flat = values.reshape(-1, adapter.experts)
            mask = _mask_of(current["x"], values.shape)
            if mask is None:
                weights = np.ones(flat.shape[0], "float32")
            else:
                extra = values.shape[mask.ndim : -1]
                weights = np.broadcast_to(
                    mask.reshape(mask.shape + (1,) * len(extra)),
                    values.shape[:-1],
                ).reshape(-1)
            sums[path] = sums[path] + weights @ flat
            counts[path] += float(weights.sum())
            return g

        return gates

    with contextlib.ExitStack() as stack:
        for path, adapter in routed.items():
            stack.enter_context(
                patched(adapter, "gates", recording(path, adapter))
            )
        for x in batches:
            current["x"] = x
            model(x, training=False)
    means = {}
    for path in routed:
        if counts[path] == 0:
            raise ValueError(
                f"Calibration data never reached adapted layer {path!r} "
                "(or its padding mask is all zeros): no mean gate."
            )
        means[path] = (sums[path] / counts[path]).astype("float32")
    return means


def _measure(model, merged, batches):
    """Output error of `merged` against the live adapters of `model`."""
    squared_error = squared_norm = max_abs = 0.0
    samples = 0
    for x in batches:
        live = keras.tree.flatten(model(x, training=False))
        plain = keras.tree.flatten(merged(x, training=False))
        for a, b in zip(live, plain, strict=False):
            a = np.asarray(ops.convert_to_numpy(a), "float64")
            b = np.asarray(ops.convert_to_numpy(b), "float64")
            squared_error += float(np.sum((b - a) ** 2))
            squared_norm += float(np.sum(a**2))
            max_abs = max(max_abs, float(np.max(np.abs(b - a))))
        samples += int(live[0].shape[0])
    relative = (squared_error / max(squared_norm, 1e-30)) ** 0.5
    return {"max_abs": max_abs, "relative": relative, "samples": samples}


def _rebuild_base(model):
    """A new model of the original classes from `model`'s base config."""
    custom = {}
    for m in holders(model):
        cls = base_class(m)
        custom[keras.saving.get_registered_name(cls)] = cls
    config = serialize_as_base(model)
    config.pop("compile_config", None)
    tied = tied_embeddings.omitted_tied_embeddings(model)
    tied_embeddings.add_tied_embeddings(config, tied)
    merged = keras.saving.deserialize_keras_object(
        config, custom_objects=custom
    )
    if tied is not None:
        tied_embeddings.keep_tied_embeddings_in_config(
            getattr(merged, "backbone", None) or merged, tied
        )
    if not merged.built:
        raise ValueError(
            f"The base of model {model.name!r} did not rebuild from its "
            "config as a built model, so it cannot be merged into a new "
            "model. Give its class a `get_config` that lists its "
            "constructor arguments and a `build` method, or serve the live "
            "adapters (`model.save(...)`, `model.export(...)`)."
        )
    return merged


def _copy_tokenizer_assets(model, merged):
    """Gives the merged model's tokenizer the original's vocabulary.

    A keras-hub tokenizer keeps its vocabulary (and merges, or
    SentencePiece proto) as assets, not in its config: the tokenizer that
    the rebuilt model's config makes is empty, and `generate`,
    `save_to_preset` or `export_to_transformers` of the merged model
    would fail on it. The assets go through the tokenizer's own
    `save_assets`/`load_assets`, as `.keras` saving moves them.
    """
    source = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
    target = getattr(getattr(merged, "preprocessor", None), "tokenizer", None)
    if source is None or target is None:
        return
    if not (hasattr(source, "save_assets") and hasattr(target, "load_assets")):
        return
    with tempfile.TemporaryDirectory() as folder:
        source.save_assets(folder)
        target.load_assets(folder)


def _delta(adapter, gates):
    """`dW` of one adapter in the kernel's layout, float32."""
    a = ops.cast(adapter.shared_a.kernel, "float32")  # (d_in, rank)
    b = ops.cast(adapter.b_kernel, "float32")  # (experts, rank, d_out)
    scale = ops.cast(adapter.suppression, "float32") * (
        adapter.alpha / adapter.rank
    )
    if gates is None:
        mixed = b[0]
    else:
        mixed = ops.einsum("m,mro->ro", ops.convert_to_tensor(gates), b)
    delta = ops.matmul(a, mixed) * scale  # (d_in, d_out)
    axes = adapter.axes
    delta = ops.reshape(delta, axes.in_shape + axes.out_shape)
    return ops.transpose(delta, tuple(np.argsort(axes.kernel_to_2d)))


def _copy_weights(model, merged, state, gates):
    relora_ids = {id(v) for v in state.variables().values()}
    for group in state.named.values():  # Every named adapter's.
        relora_ids.update(id(v) for v in group.variables().values())
    if state.selector is not None:
        relora_ids.update(id(v) for v in state.selector.weights)
    source = [v for v in model.weights if id(v) not in relora_ids]
    target = merged.weights
    if len(source) != len(target) or any(
        tuple(s.shape) != tuple(t.shape)
        for s, t in zip(source, target, strict=False)
    ):
        raise ValueError(
            f"The rebuilt base of model {model.name!r} does not have the "
            f"adapted model's base weights ({len(target)} vs "
            f"{len(source)} variables, or other shapes), so the merge "
            "cannot copy them. Was the model changed after it was built?"
        )
    kernels = {}
    for path, adapter in state.adapters.items():
        if not adapter.pruned:
            kernels[id(adapter._base_layer.kernel)] = (path, adapter)
    for src, dst in zip(source, target, strict=False):
        if id(src) not in kernels:
            # A copy: on JAX, `assign` keeps the array itself, and a
            # compiled step that donates its state would delete it in
            # both models.
            dst.assign(ops.copy(src))
            continue
        path, adapter = kernels[id(src)]
        value = ops.cast(src, "float32") + _delta(adapter, gates.get(path))
        if not bool(ops.all(ops.isfinite(value))):
            raise ValueError(
                f"Merging the adapter of {path!r} gives NaN or Inf in "
                "`W + dW`; the model was not merged. Check the adapter "
                "weights (`keras_relora.get_state(model).adapters`) for "
                "NaN or overflow."
            )
        dst.assign(ops.cast(value, dst.dtype))
