"""The class an adapted model gets, so that it saves with its adapters.

The trap: Keras rebuilds a model from its constructor config, and
keras-hub backbones rebuild every sub-layer from theirs. The adapters that
`enable_relora` injects are in no config, so `keras.models.load_model` of
an adapted model either raises ("objects could not be loaded") or, worse,
loads the base alone and gives wrong outputs.

The mechanism: `enable_relora` changes the class of the adapted model to a
subclass of its own class (`saving_class`, made once per class; a
`Llama3Backbone` is still a `Llama3Backbone`, with the same name, methods
and `isinstance` answers), recorded as a patch of its `ReloraState`, so
`unload` gives the model its own class back. The subclass changes only
serialization:

* `get_config()` returns `{"base": <the model serialized as its own
  class>, "relora": <the enable_relora settings, pruned adapters>}` under
  the registered name `keras_relora>ReloraModel`.
* `keras_relora.ReloraModel.from_config` (the loader, in
  `saving.model_saving`) deserializes the base, calls `enable_relora` with
  the stored settings (targets as the exact saved layer paths), prunes the
  adapters that were pruned, and recreates the Reducer's variables if
  there were some. The rebuilt layer tree is then the saved one, so Keras
  restores every weight into it: base, adapters, Reducer scores,
  optimizer slots.

A Task adapted through `enable_relora(task)` gets the subclass; its
backbone keeps its class (the Task's config rebuilds it).

A model that cannot round-trip through a file refuses to be saved there:
`model.save("x.h5")` (the legacy format stores weights per layer list, not
per path) and keras-hub's `save_to_preset` and `export_to_transformers`,
also on an adapted Task's backbone (`from_preset` would rebuild the base
class without adapters; the exporter writes the base kernels), raise a
`ValueError` that says what to use instead.

`.weights.h5` files of adapted models carry a manifest of the adapters
that `load_weights` checks first (see `weights_file`, also for the known
gap: a model *without* adapters ignores them). `keras.models.clone_model`
of an adapted functional model refuses (Keras would clone the layers
without their adapters); a subclassed one is cloned with its adapters.
"""

import contextlib
import os

import keras
import numpy as np

from keras_relora import _atomic_writes
from keras_relora import _keras_internals
from keras_relora.adapt.int4_embeddings import weight_only_int4_embeddings
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state
from keras_relora.adapt.state import holders
from keras_relora.adapt.state import patched
from keras_relora.adapt.targets import relative_path
from keras_relora.adapt.tied_embeddings import add_tied_embeddings
from keras_relora.adapt.tied_embeddings import omitted_tied_embeddings
from keras_relora.adapt.weights_file import check_load
from keras_relora.adapt.weights_file import is_single_h5
from keras_relora.adapt.weights_file import read_manifest
from keras_relora.adapt.weights_file import refuse_clone
from keras_relora.adapt.weights_file import write_manifest

# The name adapted models serialize under; `saving.model_saving` registers
# the loader, `ReloraModel`, under it.
LOADER_NAME = "keras_relora>ReloraModel"
FORMAT_VERSION = 1

# Original class -> its saving subclass, one per class for the process.
_SUBCLASSES = {}


def attach(model, state):
    """Makes `model` (just adapted) save, load and export with its adapters.

    Changes the class of `model` in place to its `saving_class`, refuses
    keras-hub's base-only writers on a Task's backbone, and registers the
    adapter variables as torch parameters (see `refresh_torch_parameters`).
    Every change is a patch of `state`.
    """
    cls = type(model)
    if getattr(cls, "_relora_base_class", None) is None:
        state.patch(model, "__class__", saving_class(cls))
    inner = adapted_model(model)
    for name, refusal in _REFUSALS.items():
        if inner is not model and hasattr(inner, name):
            # A Task's backbone holds the adapters but keeps its own class
            # (the Task's config rebuilds it): refuse on the instance.
            state.patch(inner, name, refusal.__get__(inner))
    refresh_torch_parameters(model)


def refresh_torch_parameters(model):
    """On torch, lists the model's current variables as its parameters.

    A built Keras model registers its variables as torch parameters once,
    at build time; variables added later (the adapters) are then missing
    from `model.parameters()`, and `torch.onnx` tracing fails on them
    ("Cannot insert a Tensor that requires grad as a constant"). Variables
    removed later (by `unload`) would stay.
    """
    if keras.config.backend() != "torch":
        return
    if any(_keras_internals.is_deferred(v) for v in model.weights):
        # A `budget` plan: variables deferred in a StatelessScope must stay
        # unallocated (listing them as parameters would allocate them).
        return
    for holder in holders(model):
        _keras_internals.list_torch_parameters(holder)


def base_class(model):
    """The class `model` had before `enable_relora`."""
    cls = type(model)
    return getattr(cls, "_relora_base_class", None) or cls


def serialize_as_base(model):
    """`keras.saving.serialize_keras_object(model)` of its own classes.

    `model` and the model that holds its layers are serialized as the
    classes they had before `enable_relora`.
    """
    with contextlib.ExitStack() as stack:
        for holder in holders(model):
            stack.enter_context(
                patched(holder, "__class__", base_class(holder))
            )
        return dict(keras.saving.serialize_keras_object(model))


class _SavesRelora:
    """Mixin of the per-class saving subclasses (see the module doc)."""

    _relora_base_class = None

    def get_config(self):
        return relora_config(self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if isinstance(config, dict) and {"base", "relora"} <= set(config):
            # The loader registered under `LOADER_NAME` (`ReloraModel`).
            loader = keras.saving.get_custom_objects()[LOADER_NAME]
            return loader.from_config(config)
        # `keras.models.clone_model` of a subclassed model deserializes the
        # base config with this class as a custom object.
        return cls._relora_base_class.from_config(config)

    def compile_from_config(self, config):
        # Keras skips this for a class with its own `compile` (keras-hub
        # tasks): a reloaded task kept its fresh default optimizer at step
        # 0 and the Reducer repeated its decisions. The saved config holds
        # `compile`'s public arguments, which a task's `compile` takes;
        # building the optimizer gives its saved state somewhere to load.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def save_weights(self, filepath, *args, **kwargs):
        if not is_single_h5(filepath):
            return super().save_weights(filepath, *args, **kwargs)
        if not _atomic(filepath, args, kwargs):
            result = super().save_weights(filepath, *args, **kwargs)
            write_manifest(filepath, named_config(get_state(self), self))
            return result
        # Weights and manifest are complete before the file takes its name.
        with _atomic_writes.atomic_file(filepath) as partial:
            result = super().save_weights(partial, *args, **kwargs)
            write_manifest(partial, named_config(get_state(self), self))
        return result

    def load_weights(self, filepath, *args, **kwargs):
        if is_single_h5(filepath):
            saved = read_manifest(filepath)
            state = get_state(self)
            check_load(self.name, filepath, named_config(state, self), saved)
            if saved.get("reducer") and state.reducer is None:
                state.add_reducer(self, seed=0)  # Its scores load as weights.
        result = super().load_weights(filepath, *args, **kwargs)
        _sync_active(get_state(self))
        return result

    def save(self, filepath, *args, **kwargs):
        if str(filepath).endswith((".h5", ".hdf5")):
            raise ValueError(
                f"Cannot save model {self.name!r} with ReLoRA adapters in "
                "the legacy HDF5 format: it stores weights per layer list, "
                "so the adapters would not load back reliably. Use "
                "`model.save('model.keras')`, "
                "`model.save_relora_weights('adapters.safetensors')`, or "
                "`keras_relora.merge_relora(model).save(...)`. "
                f"Received: filepath={filepath!r}"
            )
        if not (
            str(filepath).endswith(".keras")
            and (args[1:2] or [kwargs.get("zipped")])[0] is not False
            and _atomic(filepath, args, kwargs)
        ):
            return super().save(filepath, *args, **kwargs)
        with _atomic_writes.atomic_file(filepath) as partial:
            return super().save(partial, *args, **kwargs)


def _atomic(filepath, args, kwargs):
    """Whether a Keras save to `filepath` can go through a temporary file:
    a local path, and no overwrite question to ask (`overwrite=False` on
    an existing file goes to Keras, which asks)."""
    if not isinstance(filepath, (str, os.PathLike)) or "://" in str(filepath):
        return False
    overwrite = args[0] if args else kwargs.get("overwrite", True)
    return bool(overwrite) or not os.path.exists(filepath)


def _sync_active(state):
    """Makes the adapter that a loaded selector selects the active one."""
    if state is None or state.selector is None:
        return
    mix = keras.ops.convert_to_numpy(state.selector.mix)
    (hot,) = np.nonzero(mix)
    if len(hot) == 1 and mix[hot[0]] == 1:
        state.activate(list(state.named)[int(hot[0])])


def _save_to_preset(self, preset_dir, *args, **kwargs):
    raise ValueError(
        f"Cannot save model {self.name!r} with ReLoRA adapters as a "
        "keras-hub preset: `from_preset` rebuilds the base class and would "
        "drop the adapters. To ship a preset, merge first: "
        "`keras_relora.merge_relora(model).save_to_preset(dir)`. To keep "
        "the adapters, use `model.save_relora_weights(path)` with the base "
        "preset, or `model.save('model.keras')`. "
        f"Received: preset_dir={preset_dir!r}"
    )


def _export_to_transformers(self, path, *args, **kwargs):
    raise ValueError(
        f"Cannot export model {self.name!r} with ReLoRA adapters with "
        "`export_to_transformers`: it writes the base kernels and would "
        "drop the adapters. Merge first: "
        "`keras_relora.merge_relora(model).export_to_transformers(path)`, "
        "or keep the adapters as a PEFT folder for the exported base: "
        f"`keras_relora.save_peft(model, folder)`. Received: path={path!r}"
    )


# keras-hub methods that would write the base alone, and their refusals.
_REFUSALS = {
    "save_to_preset": _save_to_preset,
    "export_to_transformers": _export_to_transformers,
}


def saving_class(cls):
    """The subclass of `cls` that adapted models of class `cls` get."""
    sub = _SUBCLASSES.get(cls)
    if sub is not None:
        return sub
    namespace = {
        # The `module` of the saved config: loading without
        # `import keras_relora` then fails with Keras's "Could not locate
        # class ... make sure they are all imported ... 'module':
        # 'keras_relora'" rather than a generic `from_config` TypeError.
        "__module__": "keras_relora",
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_relora_base_class": cls,
    }
    for name, refusal in _REFUSALS.items():
        if hasattr(cls, name):
            namespace[name] = refusal
    _keras_internals.refuse_graph_clones(namespace, cls, refuse_clone)
    sub = type(cls.__name__, (_SavesRelora, cls), namespace)
    # Serialize instances of `sub` under the loader's registered name, and
    # keep the name pointing at the loader (registration also maps the name
    # to the last registered class).
    objects = keras.saving.get_custom_objects()
    loader = objects.get(LOADER_NAME)
    keras.saving.register_keras_serializable(
        package="keras_relora", name="ReloraModel"
    )(sub)
    if loader is not None:
        objects[LOADER_NAME] = loader
    _SUBCLASSES[cls] = sub
    return sub


def relora_state_config(state, model):
    """The JSON-able description of `model`'s adapters that rebuilds them.

    Layer paths are relative to the model that holds the layers
    (`targets.relative_path`), so they match however it was built.
    """
    root = adapted_model(model)
    settings = _jsonable(state.settings)
    settings["targets"] = [relative_path(root, p) for p in state.adapters]
    return {
        "version": FORMAT_VERSION,
        "settings": settings,
        "pruned": [
            relative_path(root, path)
            for path, adapter in state.adapters.items()
            if adapter.pruned
        ],
        "reducer": state.reducer is not None,
    }


def relora_config(model):
    """`{"base": ..., "relora": ...}`: the config `ReloraModel` loads."""
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"Model {model.name!r} has the ReLoRA saving class but no ReLoRA "
            "state. Call `keras_relora.unload(model)` to restore its class."
        )
    base = serialize_as_base(model)
    # The outer config carries the compile config; the base is compiled
    # once, after its adapters exist (its trainable set is then the same).
    base.pop("compile_config", None)
    base.pop("shared_object_id", None)
    add_tied_embeddings(base, omitted_tied_embeddings(model))
    relora = named_config(state, model)
    weight_only = weight_only_int4_embeddings(model)
    if weight_only:
        relora["weight_only_int4_embeddings"] = weight_only
    return {"base": base, "relora": relora}


def named_config(state, model):
    """`relora_state_config`, and with several named adapters each one's
    under `"named"` (in the order added) and the active one's name."""
    config = relora_state_config(state, model)
    if len(state.named) < 2:
        return config
    active = state.active
    named = []
    try:
        for name in state.named:
            state.activate(name)
            entry = relora_state_config(state, model)
            named.append(
                {
                    "name": name,
                    "settings": entry["settings"],
                    "pruned": entry["pruned"],
                }
            )
    finally:
        state.activate(active)
    return {**config, "named": named, "active": active}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
