"""The Reducer's model-side state: block scores and the sampling seed."""

import keras
import numpy as np

from keras_relora import _keras_internals
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import require_state

STATE_ATTRIBUTE = "relora_reducer"


class _ReducerState(keras.layers.Layer):
    """The Reducer's model-side state: block scores and the sampling seed.

    Kept on the adapted model (untracked by its layer list, so the model's
    variables and train step do not change) under the attribute
    `relora_reducer`, where `save_weights` finds it, and registered in the
    model's `ReloraState.extra_variables`, which adapter checkpoints carry.
    """

    def __init__(self, num_blocks, **kwargs):
        super().__init__(**kwargs)
        self.num_blocks = num_blocks
        self.scores = self.add_weight(
            name="scores",
            shape=(num_blocks,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )
        self.seed = self.add_weight(
            name="seed",
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
        )
        self.built = True


def reducer_state(model, create_seed=None):
    """The Reducer state of `model`; made with `create_seed` if missing."""
    state = require_state(model, "`ReducerCallback`")
    root = adapted_model(model)
    reducer = root.__dict__.get(STATE_ATTRIBUTE)
    if reducer is None and create_seed is not None:
        reducer = _ReducerState(state.num_blocks, name=STATE_ATTRIBUTE)
        reducer.seed.assign(np.int32(create_seed))
        # A plain attribute: `save_weights` walks attributes, while the
        # model's variable lists (and so its compiled step) stay as they are.
        _keras_internals.set_untracked(root, STATE_ATTRIBUTE, reducer)
        for variable in reducer.weights:
            state.extra_variables[variable.path] = variable
    return reducer


def existing_reducer_state(model):
    """The Reducer state of `model`, or None (no `require_state` check)."""
    return adapted_model(model).__dict__.get(STATE_ATTRIBUTE)
