"""Adapter-only checkpoints: `save_relora_weights`, `load_relora_weights`.

One small file holds the ReLoRA settings and the adapter variables, keyed
by layer path (not by position), so it loads into any instance of the same
base model, adapted or not.

The file is safetensors: loading it runs no code (no pickle, unlike
`torch.save` or `np.load(allow_pickle=True)`), the same file is read on the
three backends through numpy, its JSON header holds the settings next to the
tensors, and its header and offsets are checked on load, so a truncated
file is caught. A SHA-256 digest in the header covers the tensors, the
settings and the base description (file version 2), so changed bytes are
caught too. It is also readable by other tools (`safetensors`,
Hugging Face) without Keras.

Layout:

* tensors `shared_a/<group>/kernel` (one per shared A; `<group>` is
  `<role>:<d_in>` with `share_a="role"`, the layer path with `"layer"`),
  `adapters/<layer path>/<variable>` (`b_kernel`, `router_kernel`,
  `suppression`), `extra/<variable path>` (e.g. the Reducer's scores) and
  `trained/<variable path>` (the layers of `train_layers`, such as a
  Task's head, which train in full);
* metadata `format`, `version`, `relora` (JSON: the `enable_relora`
  settings, targets as layer paths, pruned adapters, each adapter's A
  group), `base` (JSON: the base class, each target's kernel shape and a
  few of its values, or of its quantized values and scales, to recognise
  another base model), `sha256` (see `adapter_file`).
"""

import os
import warnings

import numpy as np
from keras import ops

from keras_relora._checks import adapter_args
from keras_relora._checks import int_arg
from keras_relora._checks import model_arg
from keras_relora.adapt import named_adapters
from keras_relora.adapt.enable_relora import remove_added
from keras_relora.adapt.model_class import base_class
from keras_relora.adapt.model_class import relora_state_config
from keras_relora.adapt.report import count_params
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state
from keras_relora.adapt.state import require_state
from keras_relora.adapt.targets import relative_path
from keras_relora.layers.relora_dense import ReloraDense
from keras_relora.saving import adapter_file
from keras_relora.saving.model_saving import adaptable_layers
from keras_relora.saving.model_saving import enable_from_config

# Settings that change the variables or the outputs: they must match.
_STRICT = ("rank", "experts", "alpha", "share_a", "router_input", "top_k")
# Training-only settings: the model's own are kept (a warning says so).
_TRAINING = ("train_a", "dropout", "balance_loss")
_FINGERPRINT_SIZE = 8


def save_relora_weights(model, filepath, adapter_name=None):
    """Saves the ReLoRA settings and adapter variables of `model`.

    Writes one safetensors file (see the module docstring for why) with the
    `enable_relora` settings, the pruned adapters, and every adapter
    variable keyed by layer path. The file is written next to its
    destination and moved into place, so an interrupted save never leaves a
    half-written checkpoint. Does not change `model`.

    On a model with several named adapters, the file holds one adapter
    (the active one, or `adapter_name`) and the model's `train_layers`
    (shared by its adapters); it is the file a model with that adapter
    alone writes. A file does not record the adapter's name: the loader
    chooses it.

    Args:
        model: A `keras.Model` with ReLoRA adapters.
        filepath: str or `os.PathLike`. Path ending in `.safetensors`.
        adapter_name: str or None. The adapter to save, one of
            `keras_relora.adapter_names(model)`. Defaults to `None` (the
            active adapter).

    Example:

    ```python
    backbone.enable_relora(rank=8, experts=4)
    backbone.fit(...)
    backbone.save_relora_weights("adapters.safetensors")
    ```
    """
    state = require_state(model, "`save_relora_weights`")
    filepath = adapter_file.check_path(filepath)
    named_adapters.resolve_name(state, adapter_name, "`save_relora_weights`")
    with named_adapters.activated(state, adapter_name):
        tensors = {
            key: _to_numpy(variable)
            for key, variable in _variables(model, state).items()
        }
        relora = _relora_description(model, state)
        base = _base_description(model, state)
    adapter_file.write(filepath, tensors, relora=relora, base=base)


def load_relora_weights(model, filepath, *, check_base=True, adapter_name=None):
    """Loads adapters saved by `save_relora_weights` into `model`.

    If `model` has no adapters, they are first enabled with the settings
    stored in the file (rank, experts, targets, ...), as
    `model.enable_relora(...)` would. If it has adapters, their settings,
    targets and variable shapes must match the file's.

    Everything is checked before anything is assigned: on any difference
    (rank, experts, alpha, share_a, router options, targets, missing
    layers, shapes, pruned adapters, another base model) or a truncated or
    corrupted file, a `ValueError` lists what differs and `model` is left
    as it was (adapters enabled for the load are removed again). Changes
    `model` in place otherwise; compile it again afterwards if it was
    compiled without adapters.

    Named adapters (as PEFT's `load_adapter(path, adapter_name)`): with
    `adapter_name`, the file loads into the model's adapter of that name,
    whose settings must match, or, if the model has no adapter of that
    name, into a new adapter of that name enabled with the file's settings
    (the active adapter stays active; `keras_relora.set_adapter` switches).
    Without, it loads into the active adapter, or enables "default" on a
    model without adapters. Files written before named adapters existed
    are files of one adapter and load the same way. A file's
    `train_layers` values go to the model's, which its adapters share.

    Args:
        model: A built `keras.Model` (or keras-hub Task), with or without
            ReLoRA adapters.
        filepath: str or `os.PathLike`. A file written by
            `save_relora_weights`.
        check_base: bool. Also compare a few kernel values of each target
            layer with those recorded at save time, to refuse adapters
            trained on another base model of the same architecture. Pass
            `False` to load onto a changed base (e.g. further fine-tuned).
            Quantized layers compare their quantized values and scales; a
            float base and its quantized copy are not compared. Defaults
            to `True`.
        adapter_name: str or None. The named adapter to load into (an
            existing one) or to add (a new name). Defaults to `None` (the
            active adapter; "default" on a model without adapters).

    Returns:
        `model`.

    Example:

    ```python
    backbone = keras_hub.models.Llama3Backbone.from_preset("llama3_8b_en")
    backbone.load_relora_weights("adapters.safetensors")  # enables, loads
    backbone.load_relora_weights("sst2.safetensors", adapter_name="sst2")
    ```
    """
    model_arg(model)
    if adapter_name is not None:
        named_adapters.check_adapter_name(adapter_name)
    content = adapter_file.read(filepath)
    relora, base, tensors = content
    _check_file(model, filepath, relora, base, tensors)
    state = get_state(model)
    if state is None or (
        adapter_name is not None and adapter_name not in state.named
    ):
        name = adapter_name or "default"
        _refuse(model, filepath, _check_fresh(model, relora, base, check_base))
        try:
            state = enable_from_config(model, relora, adapter_name=name)
            with named_adapters.activated(state, name):
                _refuse(
                    model, filepath, _check(model, state, content, check_base)
                )
                _assign(model, state, content)
        except BaseException:
            if get_state(model) is not None:
                remove_added(model, get_state(model), name)
            raise
        return model
    with named_adapters.activated(state, adapter_name):
        _refuse(model, filepath, _check(model, state, content, check_base))
        _warn_training_settings(state, relora)
        _assign(model, state, content)
    return model


def _to_numpy(variable):
    value = np.asarray(ops.convert_to_numpy(variable))
    if value.dtype.kind not in "fiub" or value.dtype.itemsize > 8:
        value = value.astype("float32")  # e.g. bfloat16 from ml_dtypes.
    return np.array(value, order="C", copy=True)  # 0-d stays 0-d.


def _variables(model, state):
    """`{file key: variable}` of every adapter variable, in a fixed order."""
    found = {}
    shared_ids = set()
    for group, shared in _shared_a(model, state).items():
        for variable in shared.weights:
            found[f"shared_a/{group}/{variable.name}"] = variable
            shared_ids.add(id(variable))
    for path, adapter in _adapters(model, state).items():
        for variable in adapter.weights:
            if id(variable) not in shared_ids:
                found[f"adapters/{path}/{variable.name}"] = variable
    for path, variable in state.extra_variables.items():
        found[f"extra/{path}"] = variable
    for path, variable in state.trained.items():
        found[f"trained/{path}"] = variable  # `train_layers`: a Task's head.
    return found


def _adapters(model, state):
    """`{relative layer path: ReloraDense}`."""
    root = adapted_model(model)
    return {
        relative_path(root, path): adapter
        for path, adapter in state.adapters.items()
    }


def _shared_a(model, state):
    """`{group: SharedLoraA}`, the groups of `share_a="layer"` relative."""
    root = adapted_model(model)
    return {
        relative_path(root, group): shared
        for group, shared in state.shared_a.items()
    }


def _groups(model, state):
    by_id = {
        id(shared): group for group, shared in _shared_a(model, state).items()
    }
    return {
        path: by_id.get(id(adapter.shared_a))
        for path, adapter in _adapters(model, state).items()
    }


def _relora_description(model, state):
    description = relora_state_config(state, model)
    description["groups"] = _groups(model, state)
    return description


def _base_description(model, state):
    root = adapted_model(model)
    kernels = {}
    fingerprint = {}
    for path, adapter in _adapters(model, state).items():
        layer = adapter._base_layer
        kernels[path] = [int(d) for d in adapter.axes.kernel_shape]
        fingerprint[path] = _fingerprint(layer)
    return {
        "class": base_class(root).__name__,
        "kernel_shapes": kernels,
        "fingerprint": fingerprint,
    }


def _fingerprint(layer):
    """A few kernel values at fixed positions, to recognise the base.

    A list for a float kernel; for a quantized one (`model.quantize`),
    `{"mode": ..., "kernel": [...], "scale": [...]}` with the quantized
    values and their scales, so adapters saved on one int8 base refuse
    another.
    """
    mode = getattr(layer.dtype_policy, "quantization_mode", None)
    if mode is None:
        return _sample(layer.kernel)
    scale = getattr(layer, "kernel_scale", None)
    return {
        "mode": mode,
        "kernel": _sample(layer.kernel),
        "scale": None if scale is None else _sample(scale),
    }


def _sample(variable):
    size = int(np.prod(variable.shape))
    index = np.linspace(0, size - 1, _FINGERPRINT_SIZE).astype("int32")
    values = ops.take(ops.reshape(variable, (-1,)), index)
    return ops.convert_to_numpy(ops.cast(values, "float32")).tolist()


def _check_file(model, filepath, relora, base, tensors):
    """Refuses, before anything is allocated, a file whose description is
    malformed or whose settings do not fit its own tensors or the model
    (a forged `rank` or `experts` would allocate huge adapters)."""

    def invalid(reason):
        return ValueError(
            f"{os.fspath(filepath)!r} is not a valid keras_relora adapter "
            f"file: {reason}. Save the adapters again with "
            "`model.save_relora_weights(path)`; nothing was loaded."
        )

    if not isinstance(relora, dict) or not isinstance(
        relora.get("settings"), dict
    ):
        raise invalid("its `relora` description has no `settings` object")
    if not isinstance(base, dict) or not {"class", "kernel_shapes"} <= set(
        base
    ):
        raise invalid("its `base` description lacks `class`/`kernel_shapes`")
    settings = relora["settings"]
    for key in ("rank", "experts", "targets"):
        if key not in settings:
            raise invalid(f"its settings have no `{key}`")
    try:
        rank = int_arg("rank", settings["rank"], 1, "a positive int")
        adapter = adapter_args(
            settings["experts"],
            settings.get("alpha"),
            settings.get("dropout", 0.0),
            settings.get("router_input", "projected"),
            settings.get("top_k"),
            settings.get("balance_loss", 0.0),
        )
    except (TypeError, ValueError) as error:
        raise invalid(f"its settings are out of range ({error})") from None
    experts = adapter["experts"]
    targets = settings["targets"]
    pruned = relora.get("pruned", [])
    if not (
        isinstance(targets, list)
        and targets
        and all(isinstance(t, str) for t in targets)
        and isinstance(pruned, list)
        and all(isinstance(p, str) for p in pruned)
    ):
        raise invalid(
            "its settings' `targets` (and `pruned`) must be non-empty lists "
            "of layer paths"
        )
    problems = []
    a_kernels = {
        k: v.shape for k, v in tensors.items() if k.startswith("shared_a/")
    }
    if not a_kernels:
        problems.append("the file holds no A (`shared_a/...`) tensor")
    for key, shape in a_kernels.items():
        if len(shape) != 2 or shape[-1] != rank:
            problems.append(
                f"setting rank={rank}, but {key} has shape {tuple(shape)}"
            )
    for path in targets:
        if path in pruned:
            continue
        key = f"adapters/{path}/b_kernel"
        shape = tuple(tensors[key].shape) if key in tensors else None
        if shape is None or shape[:2] != (experts, rank):
            problems.append(
                f"settings experts={experts}, rank={rank}, but {key} has "
                f"shape {shape} (it must be (experts, rank, d_out))"
            )
    found = adaptable_layers(model)
    asked = 0
    for path in targets:
        if path in found:
            axes = ReloraDense.axes_of(found[path][1])
            asked += rank * (axes.d_in + experts * axes.d_out) + (
                experts * max(axes.d_in, rank) if experts > 1 else 0
            )
    limit = max(4 * count_params(adapted_model(model).weights), 2**20)
    if asked > limit:
        problems.append(
            f"settings rank={rank}, experts={experts} ask for {asked} "
            f"adapter parameters, more than the model can hold ({limit}, "
            "4 times its own parameters)"
        )
    if problems:
        raise invalid(
            "its settings do not fit its tensors or the model: "
            + "; ".join(problems[:5])
        )


def _refuse(model, filepath, problems):
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"Cannot load ReLoRA adapters from {os.fspath(filepath)!r} into "
            f"model {model.name!r}; nothing was loaded. Differences:\n"
            f"{lines}\nLoad into the base model the adapters were trained "
            "on, with the same settings, or into a model without adapters "
            "(they are then enabled with the file's settings)."
        )


def _check_fresh(model, relora, base, check_base):
    """Differences found before enabling adapters on a plain `model`."""
    root = adapted_model(model)
    found = adaptable_layers(model)
    problems = []
    name = base_class(root).__name__
    if base["class"] != name:
        problems.append(f"base model: file {base['class']}, model {name}")
    missing = [p for p in relora["settings"]["targets"] if p not in found]
    if missing:
        problems.append(f"target layers missing in the model: {missing}")
    problems += _base_differences(
        {p: layer for p, (_, layer) in found.items()}, base, check_base
    )
    return problems


def _base_differences(layers, base, check_base):
    problems = []
    changed = []
    for path, shape in base["kernel_shapes"].items():
        layer = layers.get(path)
        if layer is None:
            continue
        have = [int(d) for d in layer.kernel.shape]
        if have != shape:
            problems.append(
                f"kernel shape of {path}: file {shape}, model {have}"
            )
        elif check_base and not _same_fingerprint(
            base["fingerprint"].get(path), _fingerprint(layer)
        ):
            changed.append(path)
    if changed:
        problems.append(
            f"kernel values of {len(changed)} of {len(base['kernel_shapes'])}"
            f" target layers (e.g. {changed[0]}) differ from the base the "
            "adapters were saved on: another base model? Pass "
            "`check_base=False` to load them anyway"
        )
    return problems


def _same_fingerprint(saved, current):
    """Whether two fingerprints can come from the same base.

    A float kernel and a quantized one (or a file written before quantized
    kernels were fingerprinted: `None`) are not compared.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        return saved.get("mode") == current.get("mode") and all(
            _close(saved.get(key), current.get(key))
            for key in ("kernel", "scale")
        )
    if isinstance(saved, list) and isinstance(current, list):
        return _close(saved, current)
    return True


def _close(saved, current):
    if saved is None or current is None:
        return saved is current
    saved, current = np.asarray(saved), np.asarray(current)
    if saved.shape != current.shape:
        return False
    tolerance = 2e-2 * np.maximum(np.abs(saved), np.abs(current)) + 1e-6
    return bool(np.all(np.abs(saved - current) <= tolerance))


def _effective(settings, key):
    value = settings.get(key)
    if key == "alpha" and value is None:
        return float(settings["rank"])
    if key == "alpha":
        return float(value)
    return value


def _check(model, state, content, check_base):
    """Differences between an adapted `model` and a read file."""
    relora, base, tensors = content
    saved = relora["settings"]
    problems = []
    for key in _STRICT:
        if key == "alpha" and state.settings.get(key) is saved.get(key):
            continue  # Both default to their rank, compared above.
        have, want = _effective(state.settings, key), _effective(saved, key)
        if have != want:
            problems.append(f"{key}: file {want!r}, model {have!r}")
    adapters = _adapters(model, state)
    missing = [p for p in saved["targets"] if p not in adapters]
    extra = [p for p in adapters if p not in saved["targets"]]
    if missing:
        problems.append(f"targets in the file, not adapted: {missing}")
    if extra:
        problems.append(f"targets adapted, not in the file: {extra}")
    pruned = sorted(p for p, a in adapters.items() if a.pruned)
    if sorted(relora.get("pruned", [])) != pruned:
        problems.append(
            f"pruned adapters: file {sorted(relora.get('pruned', []))}, "
            f"model {pruned}"
        )
    groups = _groups(model, state)
    for path, group in relora.get("groups", {}).items():
        if path in groups and groups[path] != group:
            problems.append(
                f"A group of {path}: file {group!r}, model {groups[path]!r}"
            )
    root = adapted_model(model)
    name = base_class(root).__name__
    if base["class"] != name:
        problems.append(f"base model: file {base['class']}, model {name}")
    layers = {p: a._base_layer for p, a in adapters.items()}
    problems += _base_differences(layers, base, check_base)
    if problems:  # Tensor differences follow from these; list them alone.
        return problems
    variables = _variables(model, state)
    expected = {k for k in variables if not k.startswith("extra/")}
    stored = {k for k in tensors if not k.startswith("extra/")}
    absent = sorted(set(expected) - stored)
    unknown = sorted(stored - set(expected))
    if absent:
        problems.append(f"variables missing in the file: {absent}")
    if unknown:
        problems.append(f"variables in the file, not in the model: {unknown}")
    for key, variable in variables.items():
        if key in tensors:
            have = tuple(int(d) for d in variable.shape)
            if tuple(tensors[key].shape) != have:
                problems.append(
                    f"shape of {key}: file {tuple(tensors[key].shape)}, "
                    f"model {have}"
                )
    return problems


def _warn_training_settings(state, relora):
    saved = relora["settings"]
    differ = [
        f"{key} (file {saved.get(key)!r}, model {state.settings.get(key)!r})"
        for key in _TRAINING
        if key in saved and saved.get(key) != state.settings.get(key)
    ]
    if differ:
        warnings.warn(
            "Loaded ReLoRA adapters saved with other training settings; "
            f"the model keeps its own: {', '.join(differ)}.",
            stacklevel=3,
        )


def _assign(model, state, content):
    relora, _, tensors = content
    if relora.get("reducer") and state.reducer is None:
        # The file holds the Reducer's scores: give the model their home.
        state.add_reducer(model, seed=0)
    variables = _variables(model, state)
    for key, variable in variables.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(
            int(d) for d in variable.shape
        ):
            raise ValueError(
                f"Cannot load {key}: file shape {tensors[key].shape}, model "
                f"shape {tuple(variable.shape)}; nothing was loaded."
            )
    for key, variable in variables.items():
        if key in tensors:
            variable.assign(tensors[key].astype(variable.dtype))
