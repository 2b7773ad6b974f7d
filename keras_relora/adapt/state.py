"""The adapter state that every part of the package reads.

`enable_relora` puts a `ReloraState` on the model; saving, merging and the
Reducer read it through `get_state`/`require_state`. This module imports
no other module of the package, so every room can depend on it.
"""

import keras

from keras_relora import _keras_internals

# Called with the model at the end of `enable_relora`. `keras_relora.saving`
# registers the class swap that keeps adapters in `.keras` files here, so
# that `adapt` does not import `saving` (arrows point one way).
ENABLE_HOOKS = []


class ReloraState:
    """What `enable_relora` did to a model (kept on the model, untracked).

    Attributes:
        settings: dict. The `enable_relora` arguments, with `targets`
            resolved to the list of adapted layer paths.
        adapters: dict. Layer path -> `ReloraDense`, in path order.
        shared_a: dict. Group key -> `SharedLoraA`.
        blocks: list of str. Block keys; an adapter's `block` indexes it.
        frozen: list. Variables that were trainable before and were frozen.
        fit_data: dict or None. The `x`, `y`, `sample_weight`,
            `batch_size` and `validation_split` (0 when `validation_data`
            overrides it) of the latest `model.fit` call, so that callbacks
            (the Reducer's probe) can hold a batch of the training data.
        extra_variables: dict. Path -> variable of further ReLoRA state
            that checkpoints must carry (e.g. the Reducer's scores).
    """

    def __init__(self, settings, adapters, shared_a, blocks, frozen):
        self.settings = settings
        self.adapters = adapters
        self.shared_a = shared_a
        self.blocks = blocks
        self.frozen = frozen
        self.fit_data = None
        self.extra_variables = {}

    def variables(self):
        """Every ReLoRA variable, keyed by its path (A once, in order)."""
        found = {}
        for adapter in self.adapters.values():
            for variable in adapter.shared_a.weights + adapter.weights:
                found.setdefault(variable.path, variable)
        found.update(self.extra_variables)
        return found

    @property
    def num_blocks(self):
        return len(self.blocks)


def adapted_model(model):
    """The model that holds the layers: a keras-hub Task's backbone."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model):
        return backbone
    return model


def get_state(model):
    """The model's `ReloraState`, or None if ReLoRA is not enabled."""
    state = model.__dict__.get("_relora_state")
    if state is None and adapted_model(model) is not model:
        state = adapted_model(model).__dict__.get("_relora_state")
    return state


def require_state(model, what):
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"{what} needs a model with ReLoRA adapters: call "
            "`model.enable_relora(...)` first."
        )
    return state


def set_state(model, state):
    # A plain attribute, outside Keras's tracking and torch's Module registry.
    _keras_internals.set_untracked(model, "_relora_state", state)
    inner = adapted_model(model)
    if inner is not model:
        _keras_internals.set_untracked(inner, "_relora_state", state)
