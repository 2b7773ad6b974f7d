"""`ReducerCallback`: one trace, exact resume, logs, plot and arguments."""

import warnings

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora

NUM_BLOCKS = 4


def adapted_mlp(optimizer=None, metrics=None):
    keras.utils.set_random_seed(0)
    model = tm.block_mlp()
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    model.compile(
        optimizer=optimizer or keras.optimizers.AdamW(0.05, weight_decay=0.1),
        loss="mse",
        metrics=metrics,
    )
    return model


def count_traces(model):
    """Counts python executions of `train_step` and `predict_step`.

    On JAX and TensorFlow these run once per trace of the compiled
    function; on torch, once per step. (The probes run the predict step.)
    """
    counts = {"train": 0, "predict": 0}
    for kind in counts:
        original = getattr(model, f"{kind}_step")

        def counting(*args, _original=original, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _original(*args, **kwargs)

        object.__setattr__(model, f"{kind}_step", counting)
    return counts


def _numpy(variables):
    return [ops.convert_to_numpy(v).copy() for v in variables]


def test_one_trace_for_a_30_step_fit():
    model = adapted_mlp()
    counts = count_traces(model)
    reducer = keras_relora.ReducerCallback(update_layers=1, seed=0)
    x, y = tm.dense_data(240)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    steps, _ = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])  # 3 probes
    if keras.config.backend() in ("jax", "tensorflow"):
        assert counts == {"train": 1, "predict": 1}
    else:  # torch runs eagerly: one call per step, and per probe trial
        # one per 4-row chunk of the 16-row probe batch (`probe_chunk_size`).
        assert counts == {"train": 30, "predict": 9 * 4}


@pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="Keras's torch trainer needs steps_per_execution=1.",
)
def test_steps_per_execution():
    keras.utils.set_random_seed(0)
    model = tm.block_mlp()
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    model.compile(optimizer="adam", loss="mse", steps_per_execution=2)
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=3, seed=0)
    x, y = tm.dense_data(96)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 12
    # Probes at the first callback after each multiple of 3.
    steps, _ = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 4, 6, 10, 12])


def test_resume_from_checkpoint_is_exact(tmp_path):
    x, y = tm.dense_data(80)  # 10 steps per epoch at batch size 8.

    def reducer(seed):
        return keras_relora.ReducerCallback(
            update_layers=1, interval=4, seed=seed
        )

    straight = adapted_mlp()
    straight.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[reducer(3)],
    )

    first = adapted_mlp()
    first.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[reducer(3)],
    )
    path = str(tmp_path / "half.weights.h5")
    first.save_weights(path)  # Weights, Reducer state, optimizer state.

    resumed = adapted_mlp()
    resumed_callback = reducer(None)  # The seed comes from the checkpoint.
    resumed_callback.set_model(resumed)  # Makes variables to load into.
    resumed.load_weights(path)
    resumed.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[resumed_callback],
    )

    # A whole-model `.keras` checkpoint (what `ModelCheckpoint` writes)
    # restores the Reducer state and the optimizer state by itself.
    keras_path = str(tmp_path / "half.keras")
    first.save(keras_path)
    reloaded = keras.models.load_model(keras_path)
    reloaded_callback = reducer(None)
    reloaded.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[reloaded_callback],
    )

    for model, callback in (
        (resumed, resumed_callback),
        (reloaded, reloaded_callback),
    ):
        assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 20
        for a, b in zip(
            _numpy(straight.weights), _numpy(model.weights), strict=False
        ):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(
            _numpy(straight.optimizer.variables),
            _numpy(model.optimizer.variables),
            strict=False,
        ):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(straight.relora_reducer.scores),
            ops.convert_to_numpy(model.relora_reducer.scores),
        )
        np.testing.assert_array_equal(
            -ops.convert_to_numpy(model.relora_reducer.scores),
            callback.importance,
        )
        assert np.any(callback.importance != 0)


def test_checkpoint_optimizer_state_loads_without_the_reducer(tmp_path):
    # The Reducer's optimizer-side mirrors are not saved: a checkpoint of a
    # Reducer run has the optimizer variables of a plain optimizer, so it
    # loads into one (Keras skips a mismatched optimizer with a warning).
    x, y = tm.dense_data(24)
    trained = adapted_mlp()
    trained.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[keras_relora.ReducerCallback(update_layers=1, seed=0)],
    )
    path = str(tmp_path / "reducer.weights.h5")
    trained.save_weights(path)
    plain = adapted_mlp()
    plain.optimizer.build(plain.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_weights(path)
    assert int(ops.convert_to_numpy(plain.optimizer.iterations)) == 3
    expected = [
        v
        for v in trained.optimizer.variables
        if not v.name.startswith("relora_")
    ]
    assert len(expected) == len(plain.optimizer.variables)
    for a, b in zip(
        _numpy(expected), _numpy(plain.optimizer.variables), strict=False
    ):
        np.testing.assert_array_equal(a, b)


def test_scores_are_registered_for_checkpoints():
    model = adapted_mlp()
    reducer = keras_relora.ReducerCallback(seed=5)
    reducer.set_model(model)
    extra = keras_relora.get_state(model).extra_variables
    assert sorted(extra) == ["relora_reducer/scores", "relora_reducer/seed"]
    assert int(ops.convert_to_numpy(extra["relora_reducer/seed"])) == 5
    # The model's own variables (and so its train step) are unchanged.
    assert not any("relora_reducer" in v.path for v in model.weights)


def test_probes_do_not_change_training_logs():
    # With K = L every block updates every step, so training is the same
    # with or without probes: the logged loss and metric must be too. One
    # model, reset between the runs, so the step is compiled once.
    x, y = tm.dense_data(48)
    model = adapted_mlp(metrics=["mae"])
    model.optimizer.build(model.trainable_variables)
    histories = []
    for interval in (1, 1000):
        reducer = keras_relora.ReducerCallback(
            update_layers=NUM_BLOCKS,
            interval=interval,
            seed=0,
            log_importance=False,
        )
        reducer.set_model(model)
        if not histories:
            start = _numpy(model.weights + model.optimizer.variables)
        for variable, value in zip(
            model.weights + model.optimizer.variables, start, strict=False
        ):
            variable.assign(value)
        history = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[reducer],
        )
        histories.append(history.history)
    assert len(reducer.importance_history[0]) == 1  # No probe the 2nd time.
    assert histories[0] == histories[1]


def test_importance_history_logs_and_plot(tmp_path):
    model = adapted_mlp()
    reducer = keras_relora.ReducerCallback(update_layers=2, interval=2, seed=1)
    x, y = tm.dense_data(48)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[reducer]
    )
    importance = reducer.importance
    assert importance.shape == (NUM_BLOCKS,)
    np.testing.assert_array_equal(
        importance, -ops.convert_to_numpy(model.relora_reducer.scores)
    )
    steps, table = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 2, 4, 6, 8, 10, 12])
    assert table.shape == (7, NUM_BLOCKS)
    np.testing.assert_array_equal(table[0], 0)
    np.testing.assert_array_equal(table[-1], importance)
    for block in range(NUM_BLOCKS):
        logged = history.history[f"relora_importance_{block}"]
        assert len(logged) == 2
        assert logged[-1] == pytest.approx(float(importance[block]))
    pytest.importorskip("matplotlib")
    path = tmp_path / "importance.png"
    reducer.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def record_probe_batches(reducer):
    """Wraps the callback's probe loss to record each trial's `(x, y)`."""
    seen = []
    probe_loss = reducer._probe_loss

    def recording(x, y, sample_weight):
        seen.append((np.array(x), np.array(y)))
        return probe_loss(x, y, sample_weight)

    reducer._probe_loss = recording
    return seen


def test_probe_data_arrays_and_dataset():
    import tensorflow as tf

    model = adapted_mlp()
    x, y = tm.dense_data(48)
    # Fewer rows than `probe_batch_size`: every probe uses those rows (in
    # a random order).
    given = keras_relora.ReducerCallback(
        interval=2, trials=2, seed=0, probe_data=(x[-4:], y[-4:])
    )
    seen = record_probe_batches(given)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[given])
    assert len(seen) == 6
    for got_x, _ in seen:
        np.testing.assert_array_equal(
            np.sort(got_x, axis=0), np.sort(x[-4:], axis=0)
        )
    # A dataset: its successive batches, from the start when exhausted.
    dataset = tf.data.Dataset.from_tensor_slices((x[:12], y[:12])).batch(4)
    drawn = keras_relora.ReducerCallback(
        interval=1, trials=2, seed=0, probe_data=dataset
    )
    seen = record_probe_batches(drawn)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[drawn])
    assert len(seen) == 12  # 6 probes of 2 trials.
    for probe in range(6):
        start = 4 * (probe % 3)
        for trial in range(2):
            np.testing.assert_array_equal(
                seen[2 * probe + trial][0], x[start : start + 4]
            )


def test_generator_data_needs_probe_data():
    model = adapted_mlp()
    x, y = tm.dense_data(16)

    def batches():
        while True:
            yield x[:8], y[:8]

    reducer = keras_relora.ReducerCallback(seed=0)
    with pytest.raises(ValueError, match="Pass `probe_data=\\(x, y\\)`"):
        model.fit(
            batches(),
            steps_per_epoch=2,
            epochs=1,
            verbose=0,
            callbacks=[reducer],
        )
    reducer = keras_relora.ReducerCallback(seed=0, probe_data=(x, y))
    model.fit(
        batches(), steps_per_epoch=2, epochs=1, verbose=0, callbacks=[reducer]
    )


@pytest.mark.parametrize(
    "kwargs, received",
    [
        ({"update_layers": 0}, "update_layers=0"),
        ({"update_layers": 2.5}, "update_layers=2.5"),
        ({"suppress_layers": -1}, "suppress_layers=-1"),
        ({"interval": 0}, "interval=0"),
        ({"trials": 1}, "trials=1"),
        ({"suppression_factor": 1.0}, "suppression_factor=1.0"),
        ({"score_lr": 0.0}, "score_lr=0.0"),
        ({"score_lr": float("inf")}, "score_lr=inf"),
        ({"score_lr": float("nan")}, "score_lr=nan"),
        ({"score_lr": "10"}, "score_lr='10'"),
        ({"score_lr": True}, "score_lr=True"),
        ({"suppression_factor": "0.5"}, "suppression_factor='0.5'"),
        ({"suppression_factor": float("nan")}, "suppression_factor=nan"),
        ({"probe_batch_size": 0}, "probe_batch_size=0"),
        ({"probe_tokens": "inputs"}, "probe_tokens='inputs'"),
        ({"seed": -3}, "seed=-3"),
        ({"probe_data": (1,)}, "probe_data of length 1"),
    ],
)
def test_constructor_argument_errors(kwargs, received):
    # A value of the wrong type (a str, a bool) is a TypeError.
    with pytest.raises((ValueError, TypeError), match=f"Received: {received}"):
        keras_relora.ReducerCallback(**kwargs)


def test_fit_start_argument_errors():
    x, y = tm.dense_data(16)
    model = adapted_mlp()
    too_many = keras_relora.ReducerCallback(update_layers=NUM_BLOCKS + 1)
    with pytest.raises(ValueError, match="number of blocks of the model, L=4"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[too_many])
    with pytest.raises(ValueError, match="Received: suppress_layers=9"):
        keras_relora.ReducerCallback(suppress_layers=9).set_model(model)

    plain = tm.block_mlp()
    plain.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="enable_relora"):
        plain.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[keras_relora.ReducerCallback()],
        )

    uncompiled = tm.block_mlp()
    uncompiled.enable_relora(rank=2, experts=1, targets=r"layer_\d")
    with pytest.raises(ValueError, match="model.compile"):
        keras_relora.ReducerCallback().set_model(uncompiled)


def test_probe_losses_are_the_losses_with_the_sampled_blocks_suppressed(
    monkeypatch,
):
    # Each probe trial scales the adapter outputs of its sampled blocks by
    # `suppression_factor`. The adapter output is linear in B, so the
    # independent reference scales those blocks' B instead and evaluates
    # the loss on the probe batch with `ops`, outside the callback.
    from keras_relora.reducer import block_sampling

    model = adapted_mlp()
    rng = np.random.default_rng(1)
    state = keras_relora.get_state(model)
    adapters = list(state.adapters.values())
    for adapter in adapters:
        adapter.b_kernel.assign(
            rng.normal(size=adapter.b_kernel.shape).astype("float32")
        )
    x, y = tm.dense_data(40)
    probe = (x[:8], y[:8])
    calls = []
    update_scores = block_sampling.update_scores

    def spy(scores, suppressed, losses, score_lr):
        calls.append(
            ([sorted(int(b) for b in s) for s in suppressed], list(losses))
        )
        return update_scores(scores, suppressed, losses, score_lr)

    monkeypatch.setattr(block_sampling, "update_scores", spy)
    reducer = keras_relora.ReducerCallback(
        update_layers=1,
        suppress_layers=2,
        interval=5,
        trials=3,
        suppression_factor=0.25,
        seed=3,
        probe_data=probe,
    )
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[reducer],
    )
    assert len(calls) == 1  # 5 steps, interval 5: one probe, at the end.
    suppressed, losses = calls[0]
    assert len(suppressed) == 3 and all(len(s) == 2 for s in suppressed)
    for adapter in adapters:  # Restored after the probe.
        assert float(ops.convert_to_numpy(adapter.suppression)) == 1.0
    trained = _numpy([adapter.b_kernel for adapter in adapters])
    for blocks, loss in zip(suppressed, losses, strict=False):
        for adapter, b in zip(adapters, trained, strict=False):
            factor = 0.25 if adapter.block in blocks else 1.0
            adapter.b_kernel.assign(b * factor)
        prediction = ops.convert_to_numpy(model(probe[0]))
        expected = np.mean((prediction - probe[1]) ** 2)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The three trials differ, so the suppression really took effect.
    assert len({round(loss, 6) for loss in losses}) > 1


def test_a_failing_probe_leaves_no_adapter_suppressed():
    model = adapted_mlp()
    reducer = keras_relora.ReducerCallback(
        update_layers=1, suppress_layers=2, interval=5, seed=0
    )
    probe_loss = reducer._probe_loss
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # The second trial: one trial's blocks are set.
            raise RuntimeError("probe interrupted")
        return probe_loss(*args, **kwargs)

    reducer._probe_loss = failing
    x, y = tm.dense_data(40)
    with pytest.raises(RuntimeError, match="probe interrupted"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    assert len(calls) == 2
    for adapter in keras_relora.get_state(model).adapters.values():
        assert float(ops.convert_to_numpy(adapter.suppression)) == 1.0
