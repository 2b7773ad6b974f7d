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
    `relora_reducer`, where `save_weights` finds it; the scores and seed
    are registered in the model's `ReloraState.extra_variables`, which
    adapter checkpoints carry.

    It also carries the optimizer's per-block update counts of B
    (`update_counts`, with `counts_at`, the optimizer step they were
    taken at) into `save_weights` and `.keras` files: they are optimizer
    state, but saved with the optimizer they would make its variables
    differ in number from a plain optimizer's, whose checkpoints then no
    longer load into each other. They are copied from the optimizer when
    saved (`counts_source`), and the Reducer adopts them at the next
    `fit` start only if the optimizer's step is still `counts_at` (the
    optimizer state was loaded with them). Files written before these
    variables existed hold two entries and load as before.
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
        self.update_counts = self.add_weight(
            name="update_counts",
            shape=(num_blocks,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
        )
        self.counts_at = self.add_weight(
            name="counts_at",
            shape=(),
            initializer=keras.initializers.Constant(-1),
            dtype="int32",
            trainable=False,
        )
        self.built = True
        # `() -> (counts, step)` or None; set by the Reducer's optimizer.
        _keras_internals.set_untracked(self, "counts_source", None)
        # Whether the counts were loaded since the Reducer last read them.
        _keras_internals.set_untracked(self, "counts_loaded", False)

    def save_own_variables(self, store):
        source = self.counts_source() if self.counts_source else None
        if source is not None:
            counts, step = source
            self.update_counts.assign(np.asarray(counts, dtype="int32"))
            self.counts_at.assign(np.int32(step))
        super().save_own_variables(store)

    def load_own_variables(self, store):
        if len(store.keys()) == 2:  # Files from before the counts.
            self.scores.assign(store["0"])
            self.seed.assign(store["1"])
            self.counts_at.assign(np.int32(-1))
        else:
            super().load_own_variables(store)
        _keras_internals.set_untracked(self, "counts_loaded", True)


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
        for variable in (reducer.scores, reducer.seed):
            state.extra_variables[variable.path] = variable
    return reducer


def existing_reducer_state(model):
    """The Reducer state of `model`, or None (no `require_state` check)."""
    return adapted_model(model).__dict__.get(STATE_ATTRIBUTE)
