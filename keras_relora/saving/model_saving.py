"""Loading `.keras` files and configs of models with ReLoRA adapters.

An adapted model serializes as `{"base": ..., "relora": ...}` under the
registered name `keras_relora>ReloraModel` (`adapt.model_class`, where the
class that an adapted model gets is made). `ReloraModel` is the loader
Keras finds by that name: it rebuilds the base and enables the saved
adapters on it (`enable_from_config`, which `load_relora_weights` also
uses).
"""

import inspect
import re

import keras

from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.enable_relora import enable_relora
from keras_relora.adapt.int4_embeddings import restore_weight_only_int4
from keras_relora.adapt.model_class import FORMAT_VERSION
from keras_relora.adapt.named_adapters import set_adapter
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state


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
        restore_weight_only_int4(
            model, config["relora"].get("weight_only_int4_embeddings", [])
        )
        enable_from_config(model, config["relora"])
        return model


def enable_from_config(model, relora, adapter_name="default"):
    """Enables adapters on `model` exactly as `relora_state_config` says.

    The targets are matched as the exact saved (relative) layer paths, so
    the adapted layers (and the blocks they index) are the saved ones. The
    adapter is named `adapter_name` (added next to the model's adapters if
    it has some). A config of several named adapters (`relora_config`)
    enables each under its own name and activates the saved active one.
    """
    version = relora.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Unsupported ReLoRA config version {version!r}; this "
            f"keras_relora reads version {FORMAT_VERSION}. Update "
            "keras_relora to load this file."
        )
    named = relora.get("named")
    if named is not None:
        return _enable_named(model, relora, named)
    return _enable_one(model, relora, adapter_name)


def _enable_named(model, relora, named):
    for entry in named:
        state = _enable_one(model, entry, entry["name"], reducer=False)
    set_adapter(model, relora["active"])
    if relora.get("reducer"):
        state.add_reducer(model, seed=0)
    return state


def _enable_one(model, relora, adapter_name, reducer=True):
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
    kwargs.pop("adapter_name", None)
    enable_relora(model, **kwargs, adapter_name=adapter_name)
    state = get_state(model)
    group = state.named[adapter_name]
    for path in relora.get("pruned", []):
        group.adapters[found[path][0]].prune()
    if reducer and relora.get("reducer") and state.reducer is None:
        state.add_reducer(model, seed=0)  # Its scores load like any weight.
    return state


def exact_targets(paths):
    """A `targets` regex that matches exactly these layer paths."""
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def adaptable_layers(model):
    """`{relative path: (path, layer)}` of the layers `model` can adapt."""
    root = adapted_model(model)
    return {
        targets_lib.relative_path(root, path): (path, layer)
        for path, (layer, _) in targets_lib.candidates(root).items()
    }
