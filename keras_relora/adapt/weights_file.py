"""Keras's own paths for models with ReLoRA adapters: `.weights.h5`, clones.

Keras's `load_weights` matches a file to a model by layer paths and skips
what it does not find: an adapted model with fewer targets than the file
loads part of it without an error, and one with other settings (`experts`,
`rank`) fails only after it has assigned the variables it reached first.

So `save_weights` of an adapted model writes a manifest next to the
weights, as an HDF5 attribute of the file's root: the `enable_relora`
settings, the targets (relative layer paths), the pruned adapters and
whether the Reducer's state is there. `load_weights` into an adapted model
reads it first and refuses, before anything is assigned, a file without
one (written by a model without adapters, or by keras_relora before this
check) or one whose settings, targets or pruned adapters differ.

Known gap: a model *without* adapters uses Keras's own `load_weights`,
which ignores the adapter entries of such a file (Keras has no hook for
it). Enable adapters with the same settings first, or use
`save_relora_weights`/`load_relora_weights`.

`keras.models.clone_model` of a functional model clones each layer from its
config, without the adapters; `refuse_clone` makes it refuse instead (the
saving subclass calls it for each cloned layer, see
`_keras_internals.refuse_graph_clones`).
"""

import json

from keras_relora import _keras_internals
from keras_relora.adapt.state import get_state

MANIFEST = "keras_relora"
MANIFEST_VERSION = 1

# Settings that change the variables or the outputs: they must match.
STRICT = ("rank", "experts", "alpha", "share_a", "router_input", "top_k")


def is_single_h5(filepath):
    """A single `.weights.h5` file (not sharded, not a `.keras` file)."""
    return str(filepath).endswith(".weights.h5")


def write_manifest(filepath, relora):
    """Adds the manifest (`relora`: `relora_state_config`) to an h5 file."""
    import h5py

    with h5py.File(filepath, "a") as f:
        f.attrs[MANIFEST] = json.dumps(
            {"version": MANIFEST_VERSION, "relora": relora}
        )


def read_manifest(filepath):
    """The file's `relora` description, or None if it has no manifest."""
    import h5py

    with h5py.File(filepath, "r") as f:
        value = f.attrs.get(MANIFEST)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    manifest = json.loads(value)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"The keras_relora manifest of {str(filepath)!r} has version "
            f"{manifest.get('version')!r}; this keras_relora reads version "
            f"{MANIFEST_VERSION}. Update keras_relora; nothing was loaded."
        )
    return manifest["relora"]


def check_load(model_name, filepath, current, saved):
    """Raises a `ValueError` listing how `saved` differs from `current`.

    Both are `relora_state_config` descriptions; `saved` is None for a file
    without a manifest.
    """
    if saved is None:
        raise ValueError(
            f"Cannot load {str(filepath)!r} into model {model_name!r}, "
            "which has ReLoRA adapters: the file has no ReLoRA adapters "
            "manifest (it was written by a model without adapters, or by "
            "keras_relora before version 2 of its files), so Keras would "
            "load the base and leave the adapters as they are, or fail "
            "half-way. Nothing was loaded. Load it before `enable_relora`, "
            "or into a model without adapters; adapters alone go through "
            "`save_relora_weights`/`load_relora_weights`."
        )
    problems = differences(current, saved)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"Cannot load {str(filepath)!r} into model {model_name!r}: its "
            "ReLoRA adapters differ from the model's; nothing was loaded. "
            f"Differences:\n{lines}\nEnable adapters with the file's "
            "settings and targets (or `keras_relora.unload` first)."
        )


def differences(current, saved):
    """How two `relora_state_config` descriptions differ, as sentences
    (of several named adapters: the names, then each adapter's)."""
    if "named" in current or "named" in saved:
        return _named_differences(current, saved)
    have, want = current["settings"], saved["settings"]
    problems = []
    for key in STRICT:
        a, b = _effective(have, key), _effective(want, key)
        if a != b:
            problems.append(f"{key}: file {b!r}, model {a!r}")
    missing = [p for p in want["targets"] if p not in have["targets"]]
    extra = [p for p in have["targets"] if p not in want["targets"]]
    if missing:
        problems.append(f"targets in the file, not adapted: {missing}")
    if extra:
        problems.append(f"targets adapted, not in the file: {extra}")
    if sorted(current.get("pruned", [])) != sorted(saved.get("pruned", [])):
        problems.append(
            f"pruned adapters: file {sorted(saved.get('pruned', []))}, "
            f"model {sorted(current.get('pruned', []))}"
        )
    return problems


def _named_differences(current, saved):
    have = {e["name"]: e for e in current.get("named", [])}
    want = {e["name"]: e for e in saved.get("named", [])}
    if list(have) != list(want):
        return [f"named adapters: file {list(want)}, model {list(have)}"]
    problems = []
    for name, entry in want.items():
        problems += [
            f"adapter {name!r}: {p}" for p in differences(have[name], entry)
        ]
    return problems


def _effective(settings, key):
    value = settings.get(key)
    if key == "alpha":
        return float(settings["rank"] if value is None else value)
    return value


def refuse_clone(model, layer):
    """Raises if `keras.models.clone_model(model)` is cloning an adapted
    `layer` (or a layer holding one) from its config, without adapters."""
    state = get_state(model)
    if state is None:
        return
    adapted = {id(a._base_layer) for a in state.adapters.values()}
    inner = [layer, *_keras_internals.flatten_layers(layer)]
    if any(id(sub) in adapted for sub in inner):
        raise ValueError(
            f"`keras.models.clone_model` cannot clone model {model.name!r} "
            "with its ReLoRA adapters: Keras clones a functional model "
            "layer by layer from their configs, which hold no adapters, so "
            "the clone would be the base model. Save and load it instead "
            "(`model.save('model.keras')`, `keras.models.load_model`), or "
            "clone the base before `enable_relora` and load the adapters "
            "into the clone with `load_relora_weights`. "
            f"Received: layer {layer.name!r} to clone"
        )
