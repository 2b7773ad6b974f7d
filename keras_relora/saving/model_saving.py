"""Whole-model `.keras` saving of models with ReLoRA adapters.

The trap (DESIGN.md §7): Keras rebuilds a model from its constructor
config, and keras-hub backbones rebuild every sub-layer from theirs. The
adapters that `enable_relora` injects are in no config, so
`keras.models.load_model` of an adapted model either raises ("objects could
not be loaded") or, worse, loads the base alone and gives wrong outputs.

The mechanism: `enable_relora` changes the class of the adapted model to a
subclass of its own class, made once per class by `attach` (a
`Llama3Backbone` is still a `Llama3Backbone`, with the same name, methods
and `isinstance` answers). The subclass changes only serialization:

* `get_config()` returns `{"base": <the model serialized as its own
  class>, "relora": <the enable_relora settings, pruned adapters>}` under
  the registered name `keras_relora>ReloraModel`.
* `ReloraModel.from_config` deserializes the base, calls `enable_relora`
  with the stored settings (targets as the exact saved layer paths) and
  prunes the adapters that were pruned, and recreates the Reducer's state
  if there was one. The rebuilt layer tree is then the saved one, so Keras
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
`keras_relora.unload` gives the model its own class back.

`.weights.h5` files of adapted models carry a manifest of the adapters
that `load_weights` checks first (see `weights_file`, also for the known
gap: a model *without* adapters ignores them). `keras.models.clone_model`
of an adapted functional model refuses (Keras would clone the layers
without their adapters); a subclassed one is cloned with its adapters.

Why not the alternatives: writing merged kernels on save, as Keras's own
LoRA does, is exact only for `experts=1` and ends further training; wrapping
the model in a new registered `keras.Model` would change the user's object
and break keras-hub's Task API.
"""

import inspect
import re

import keras
import numpy as np

from keras_relora import _keras_internals
from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.enable_relora import enable_relora
from keras_relora.adapt.state import ENABLE_HOOKS
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state
from keras_relora.reducer.reducer_state import existing_reducer_state
from keras_relora.reducer.reducer_state import reducer_state
from keras_relora.saving import weights_file
from keras_relora.saving.tied_embeddings import add_tied_embeddings
from keras_relora.saving.tied_embeddings import omitted_tied_embeddings

LOADER_NAME = "keras_relora>ReloraModel"
FORMAT_VERSION = 1

# Original class -> its saving subclass, one per class for the process.
_SUBCLASSES = {}


def attach(model):
    """Makes `model` (just adapted) save, load and export with its adapters.

    Called by `enable_relora`. Changes the class of `model` in place to a
    subclass of its own class whose serialization is `ReloraModel`'s, and
    registers the adapter variables as torch parameters (see
    `refresh_torch_parameters`).
    """
    cls = type(model)
    if getattr(cls, "_relora_base_class", None) is None:
        _keras_internals.swap_class(model, _subclass_of(cls))
    inner = adapted_model(model)
    for name, refusal in _REFUSALS.items():
        if inner is not model and hasattr(inner, name):
            # A Task's backbone holds the adapters but keeps its own class
            # (the Task's config rebuilds it): refuse on the instance.
            _keras_internals.set_untracked(inner, name, refusal.__get__(inner))
    refresh_torch_parameters(model)


def detach(model):
    """Gives `model` its own class back (used by `keras_relora.unload`)."""
    base_cls = getattr(type(model), "_relora_base_class", None)
    if base_cls is not None:
        _keras_internals.swap_class(model, base_cls)
    for name in _REFUSALS:
        adapted_model(model).__dict__.pop(name, None)
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
    for holder in {id(m): m for m in (model, adapted_model(model))}.values():
        _keras_internals.list_torch_parameters(holder)


def base_class(model):
    """The class `model` had before `enable_relora`."""
    cls = type(model)
    return getattr(cls, "_relora_base_class", None) or cls


class _SavesRelora:
    """Mixin of the per-class saving subclasses (see the module doc)."""

    _relora_base_class = None

    def get_config(self):
        return relora_config(self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if isinstance(config, dict) and {"base", "relora"} <= set(config):
            return ReloraModel.from_config(config)
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
        result = super().save_weights(filepath, *args, **kwargs)
        if weights_file.is_single_h5(filepath):
            weights_file.write_manifest(
                filepath, relora_state_config(get_state(self), self)
            )
        return result

    def load_weights(self, filepath, *args, **kwargs):
        if weights_file.is_single_h5(filepath):
            saved = weights_file.read_manifest(filepath)
            weights_file.check_load(
                self.name,
                filepath,
                relora_state_config(get_state(self), self),
                saved,
            )
            if saved.get("reducer"):
                add_reducer_state(self)  # Its scores load like any weight.
        return super().load_weights(filepath, *args, **kwargs)

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
        return super().save(filepath, *args, **kwargs)


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


def _subclass_of(cls):
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
    _keras_internals.refuse_graph_clones(
        namespace, cls, weights_file.refuse_clone
    )
    sub = type(cls.__name__, (_SavesRelora, cls), namespace)
    # Serialize instances of `sub` under the loader's registered name, and
    # keep the name pointing at the loader (registration also maps the name
    # to the last registered class).
    keras.saving.register_keras_serializable(
        package="keras_relora", name="ReloraModel"
    )(sub)
    keras.saving.get_custom_objects()[LOADER_NAME] = ReloraModel
    _SUBCLASSES[cls] = sub
    return sub


def relative_path(model, path):
    """`path` relative to the model that holds the layers (see
    `targets.relative_path`): saved paths match however it was built."""
    return targets_lib.relative_path(adapted_model(model), path)


def relora_state_config(state, model):
    """The JSON-able description of `model`'s adapters that rebuilds them.

    Layer paths are relative (`relative_path`).
    """
    settings = _jsonable(state.settings)
    settings["targets"] = [relative_path(model, p) for p in state.adapters]
    return {
        "version": FORMAT_VERSION,
        "settings": settings,
        "pruned": [
            relative_path(model, path)
            for path, adapter in state.adapters.items()
            if adapter.pruned
        ],
        "reducer": existing_reducer_state(model) is not None,
    }


def relora_config(model):
    """`{"base": ..., "relora": ...}`: the config `ReloraModel` loads."""
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"Model {model.name!r} has the ReLoRA saving class but no ReLoRA "
            "state. Call `keras_relora.unload(model)` to restore its class."
        )
    saving_cls = type(model)
    _keras_internals.swap_class(model, base_class(model))
    try:
        base = dict(keras.saving.serialize_keras_object(model))
    finally:
        _keras_internals.swap_class(model, saving_cls)
    # The outer config carries the compile config; the base is compiled
    # once, after its adapters exist (its trainable set is then the same).
    base.pop("compile_config", None)
    base.pop("shared_object_id", None)
    add_tied_embeddings(base, omitted_tied_embeddings(model))
    return {"base": base, "relora": relora_state_config(state, model)}


def add_reducer_state(model):
    """Creates the Reducer's state (scores, seed) for values to load into."""
    if existing_reducer_state(model) is None:
        reducer_state(model, create_seed=0)


@keras.saving.register_keras_serializable(package="keras_relora")
class ReloraModel:
    """Loads a model saved with ReLoRA adapters (a `.keras` file, a config).

    Never instantiated: `keras.models.load_model` finds this class by the
    registered name `keras_relora>ReloraModel` that adapted models are
    serialized under, and its `from_config` returns the model itself, of
    its own class, with live adapters. Its weights are then restored by
    Keras from the file.

    Example:

    ```python
    backbone.enable_relora(rank=8, experts=4)
    backbone.save("adapted.keras")
    restored = keras.models.load_model("adapted.keras")  # adapters live
    ```
    """

    def get_config(self):
        raise NotImplementedError("`ReloraModel` is a loader only.")

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if not isinstance(config, dict) or not {"base", "relora"} <= set(
            config
        ):
            raise ValueError(
                "`ReloraModel.from_config` expects the config of a model "
                "saved with ReLoRA adapters, with keys 'base' and 'relora'. "
                f"Received: config keys {sorted(config or {})}"
            )
        model = keras.saving.deserialize_keras_object(
            config["base"], custom_objects=custom_objects
        )
        if not isinstance(model, keras.Model) or not model.built:
            raise ValueError(
                "The saved base model did not rebuild as a built "
                f"`keras.Model` (got {type(model).__name__}); its adapters "
                "cannot be restored. Save the adapters alone with "
                "`model.save_relora_weights(path)` and load them into a "
                "built base model."
            )
        enable_from_config(model, config["relora"])
        return model


def enable_from_config(model, relora):
    """Enables adapters on `model` exactly as `relora_state_config` says.

    The targets are matched as the exact saved (relative) layer paths, so
    the adapted layers (and the blocks they index) are the saved ones.
    """
    version = relora.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Unsupported ReLoRA config version {version!r}; this "
            f"keras_relora reads version {FORMAT_VERSION}. Update "
            "keras_relora to load this file."
        )
    settings = dict(relora["settings"])
    # Saved before `train_layers` existed: every layer was frozen.
    settings.setdefault("train_layers", [])
    targets = list(settings["targets"])
    found = adaptable_layers(model)
    missing = [path for path in targets if path not in found]
    if missing:
        raise ValueError(
            f"Cannot restore ReLoRA adapters on model {model.name!r}: the "
            f"saved target layers {missing} are not in the rebuilt model. "
            "It differs from the saved one (another config, or layers "
            "named differently)."
        )
    settings["targets"] = exact_targets(found[path][0] for path in targets)
    accepted = inspect.signature(enable_relora).parameters
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    enable_relora(model, **kwargs)
    state = get_state(model)
    for path in relora.get("pruned", []):
        state.adapters[found[path][0]].prune()
    if relora.get("reducer"):
        add_reducer_state(model)  # Its scores load like any weight.
    return state


def exact_targets(paths):
    """A `targets` regex that matches exactly these layer paths."""
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def adaptable_layers(model):
    """`{relative path: (path, layer)}` of the layers `model` can adapt."""
    found = targets_lib.candidates(adapted_model(model))
    return {
        relative_path(model, path): (path, layer)
        for path, (layer, _) in found.items()
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


ENABLE_HOOKS.append(attach)
