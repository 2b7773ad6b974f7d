"""The Reducer under hostile inputs: NaNs, empty probe data, all pruned.

Each case gets a clear error, with the model's weights bitwise unchanged,
or a defined, reported behaviour: no crash deep inside numpy
("Probabilities contain NaN"), no NaN scores stored, no bare
`StopIteration` out of `fit`, no silent no-op.
"""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora

NUM_BLOCKS = 4


def test_fit_after_pruning_every_block_refuses_before_training():
    model = tm.adapted_block_mlp()
    assert keras_relora.prune(model, 1.0, strategy="random", seed=0) == [
        0,
        1,
        2,
        3,
    ]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = tm.snapshot(model)
    x, y = tm.dense_data(32)
    with pytest.raises(
        ValueError,
        match="every block's B experts were pruned.*Received: 0 of 4 blocks",
    ):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[keras_relora.ReducerCallback(interval=1, seed=0)],
        )
    tm.assert_unchanged(model, before)


def test_nan_probe_loss_is_skipped_and_reported():
    # A probe batch with a NaN input gives NaN probe losses: the probe is
    # skipped with a warning and the scores keep their (finite) values.
    model = tm.adapted_block_mlp()
    x, y = tm.dense_data(32)
    bad_x = x[:8].copy()
    bad_x[3, 2] = np.nan
    reducer = keras_relora.ReducerCallback(
        update_layers=1, interval=2, seed=0, probe_data=(bad_x, y[:8])
    )
    with pytest.warns(UserWarning, match="non-finite probe loss.*skipped"):
        history = model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer]
        )
    assert np.isfinite(history.history["loss"][-1])  # Training went on.
    steps, _ = reducer.importance_history
    np.testing.assert_array_equal(steps, [0])  # No probe was recorded.
    np.testing.assert_array_equal(reducer.importance, np.zeros(NUM_BLOCKS))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model.relora_reducer.scores), 0.0
    )
    assert reducer.skipped_probes == [2, 4]


def test_nan_training_loss_never_makes_nan_scores():
    # A NaN in the training data makes every weight NaN after the first
    # step; the probes that follow must not crash or store NaN scores.
    model = tm.adapted_block_mlp()
    x, y = tm.dense_data(32)
    x[0, 0] = np.nan
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=1, seed=0)
    with pytest.warns(UserWarning, match="non-finite probe loss"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[reducer],
        )
    assert reducer.skipped_probes == [1, 2, 3, 4]
    assert np.all(np.isfinite(reducer.importance))
    assert np.all(
        np.isfinite(ops.convert_to_numpy(model.relora_reducer.scores))
    )


def test_non_finite_stored_scores_are_refused_before_training():
    model = tm.adapted_block_mlp()
    reducer = keras_relora.ReducerCallback(interval=1, seed=0)
    reducer.set_model(model)  # Creates the Reducer state.
    model.relora_reducer.scores.assign(
        np.array([0.0, np.nan, 0.0, 0.0], "float32")
    )
    before = tm.snapshot(model)
    x, y = tm.dense_data(32)
    with pytest.raises(ValueError, match="scores.*not finite"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[keras_relora.ReducerCallback(interval=1)],
        )
    tm.assert_unchanged(model, before)


def test_prune_refuses_non_finite_importance():
    model = tm.adapted_block_mlp()
    state = keras_relora.get_state(model)
    with pytest.raises(
        ValueError, match="`importance` must be finite.*Received: importance="
    ):
        keras_relora.prune(model, 0.5, importance=[1.0, np.nan, 0.0, 2.0])
    reducer = keras_relora.ReducerCallback(seed=0)
    reducer.set_model(model)
    model.relora_reducer.scores.assign(
        np.array([0.0, 0.0, np.inf, 0.0], "float32")
    )
    with pytest.raises(ValueError, match="learned importance.*not finite"):
        keras_relora.prune(model, 0.5)
    assert not any(adapter.pruned for adapter in state.adapters.values())


def test_empty_probe_arrays_are_refused():
    model = tm.adapted_block_mlp()
    x, y = tm.dense_data(32)
    before = tm.snapshot(model)
    reducer = keras_relora.ReducerCallback(
        interval=1, seed=0, probe_data=(x[:0], y[:0])
    )
    with pytest.raises(
        ValueError,
        match="`probe_data` is empty.*Received: probe_data with 0 samples",
    ):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    tm.assert_unchanged(model, before)


def test_empty_probe_dataset_is_refused():
    import tensorflow as tf

    model = tm.adapted_block_mlp()
    x, y = tm.dense_data(32)
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(8)
    reducer = keras_relora.ReducerCallback(interval=1, seed=0, probe_data=empty)
    with pytest.raises(
        ValueError,
        match="`probe_data` is empty.*Received: probe_data with no batch",
    ):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
