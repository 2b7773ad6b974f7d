"""Exact per-block freezing of B with `ReducerCallback`, per optimizer.

For every step of a short `fit`, the blocks the step samples (recomputed
independently from the optimizer's step counter, seed and scores) change
their B and each of its optimizer slots; every other block's B and slots are
bitwise unchanged. A and routers keep training.
"""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora
from keras_relora.reducer import block_sampling

NUM_BLOCKS = 4


def _numpy(variables):
    return [ops.convert_to_numpy(v).copy() for v in variables]


class StepRecorder(keras.callbacks.Callback):
    """Snapshots the masked variables and the mask inputs around each step."""

    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer
        self.steps = []

    def _snapshot(self):
        model = self.model  # Syncs the JAX state.
        masked = self.reducer._masked
        return {
            "iteration": int(ops.convert_to_numpy(model.optimizer.iterations)),
            "scores": ops.convert_to_numpy(masked.scores).copy(),
            "control": ops.convert_to_numpy(masked.control).copy(),
            "groups": [(block, _numpy(vs)) for block, vs in masked.groups],
            "a": _numpy(
                v for v in model.trainable_variables if "shared_a" in v.path
            ),
            "routers": _numpy(
                v for v in model.trainable_variables if "router" in v.path
            ),
        }

    def on_train_batch_begin(self, batch, logs=None):
        self.steps.append([self._snapshot()])

    def on_train_batch_end(self, batch, logs=None):
        self.steps[-1].append(self._snapshot())


OPTIMIZERS = {
    "adam": (lambda: keras.optimizers.Adam(0.05), 2),
    "adamw": (lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1), 2),
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), 1),
    "loss_scale_adam": (
        lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.05)
        ),
        2,
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unsampled_blocks_are_bitwise_frozen(name):
    make_optimizer, num_slots = OPTIMIZERS[name]
    keras.utils.set_random_seed(0)
    model = tm.block_mlp()
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    model.compile(optimizer=make_optimizer(), loss="mse")
    frozen_before = _numpy(model.non_trainable_variables)
    reducer = keras_relora.ReducerCallback(update_layers=2, interval=2, seed=7)
    recorder = StepRecorder(reducer)
    x, y = tm.dense_data(48)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[reducer, recorder],
    )

    groups = reducer._masked.groups
    assert sorted(block for block, _ in groups) == list(range(NUM_BLOCKS))
    assert all(len(variables) == 1 + num_slots for _, variables in groups)
    assert len(recorder.steps) == 6
    sampled_counts = np.zeros(NUM_BLOCKS, int)
    for step, (before, after) in enumerate(recorder.steps):
        assert after["iteration"] == before["iteration"] + 1
        seed, k, enabled = before["control"]
        assert (k, enabled) == (2, 1)
        mask = ops.convert_to_numpy(
            block_sampling.update_mask(
                before["scores"], seed, before["iteration"], k
            )
        )
        assert mask.sum() == 2
        sampled_counts += mask
        for (block, old), (_, new) in zip(
            before["groups"], after["groups"], strict=False
        ):
            for slot, (a, b) in enumerate(zip(old, new, strict=False)):
                if mask[block]:
                    assert not np.array_equal(a, b), (step, block, slot)
                else:
                    np.testing.assert_array_equal(
                        a, b, err_msg=f"step {step} block {block} slot {slot}"
                    )
        if step > 0:  # At step 0 every B is zero: A has no gradient yet.
            for a, b in zip(before["a"], after["a"], strict=False):
                assert not np.array_equal(a, b)
    # Every block was sampled at some step; the routers trained too.
    assert sampled_counts.min() > 0
    first, last = recorder.steps[0][0], recorder.steps[-1][1]
    for a, b in zip(first["routers"], last["routers"], strict=False):
        assert not np.array_equal(a, b)
    # The probes ran (the scores moved) and the base stayed frozen.
    assert np.any(reducer.importance != 0)
    for a, b in zip(
        frozen_before[:4], _numpy(model.non_trainable_variables), strict=False
    ):
        np.testing.assert_array_equal(a, b)


def test_fits_with_and_without_the_callback_alternate():
    keras.utils.set_random_seed(0)
    model = tm.block_mlp()
    model.enable_relora(rank=2, experts=1, targets=r"layer_\d")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x, y = tm.dense_data(16)
    state = keras_relora.get_state(model)
    kernels = [a.b_kernel for a in state.adapters.values()]
    reducer = keras_relora.ReducerCallback(update_layers=1, seed=0)

    def changed_blocks(callbacks):
        before = _numpy(kernels)
        # One step: the whole batch of 16.
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
        return sum(
            not np.array_equal(a, b)
            for a, b in zip(before, _numpy(kernels), strict=False)
        )

    # A train function made before the callback must not escape the mask.
    assert changed_blocks([]) == NUM_BLOCKS
    assert changed_blocks([reducer]) == 1
    assert changed_blocks([]) == NUM_BLOCKS  # The mask is off again.
    assert changed_blocks([reducer]) == 1
