"""The Reducer's probe batches, probe tokens, summary and one-model rule.

Each probe draws a fresh random batch (IST: a shuffled loader of the
training data, batch 16), seeded, without the rows `validation_split`
holds out; `probe_tokens` chooses the tokens the probe loss counts,
checked against a numpy cross-entropy of the model's logits.
"""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora
from keras_relora.reducer import probe_loss

NUM_BLOCKS = 4


def adapted_mlp(num_blocks=NUM_BLOCKS):
    keras.utils.set_random_seed(0)
    model = tm.block_mlp(num_blocks)
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    model.compile(
        optimizer=keras.optimizers.AdamW(0.05, weight_decay=0.1), loss="mse"
    )
    return model


def probe_rows(x, reducer):
    """Wraps the probe loss to record each trial's rows (indices into x)."""
    seen = []
    original = reducer._probe_loss

    def recording(px, py, sample_weight):
        rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in px]
        seen.append(rows)
        return original(px, py, sample_weight)

    reducer._probe_loss = recording
    return seen


def fit_probes(seed=0, validation_split=0.0, validation_data=None, **kwargs):
    model = adapted_mlp()
    x, y = tm.dense_data(40)
    reducer = keras_relora.ReducerCallback(
        interval=1, trials=2, seed=seed, **kwargs
    )
    seen = probe_rows(x, reducer)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        validation_split=validation_split,
        validation_data=validation_data,
        callbacks=[reducer],
    )
    # Every trial of a probe uses the probe's batch.
    assert seen[0::2] == seen[1::2]
    return seen[0::2]


def test_each_probe_draws_a_fresh_random_batch_of_16():
    probes = fit_probes()
    assert len(probes) == 10  # 5 steps per epoch, 2 epochs.
    for rows in probes:
        assert len(rows) == 16 and len(set(rows)) == 16
    # A pass of the shuffled rows has 40 // 16 = 2 disjoint batches.
    for first, second in zip(probes[0::2], probes[1::2], strict=True):
        assert not set(first) & set(second)
    assert len({tuple(rows) for rows in probes}) == 10
    assert sorted(probes[0]) != list(range(16))  # Not the first rows.
    assert set().union(*probes) == set(range(40))
    # Seeded: the same seed draws the same batches, another seed others.
    assert fit_probes() == probes
    assert fit_probes(seed=1) != probes


def test_probe_batch_size():
    probes = fit_probes(probe_batch_size=4)
    assert all(len(rows) == 4 for rows in probes)


def test_default_probe_skips_the_validation_rows():
    # Keras holds out the last 20 of 40 rows: the probe must not read them.
    probes = fit_probes(validation_split=0.5)
    assert set().union(*probes) == set(range(20))
    # `validation_data` overrides `validation_split`: all rows train.
    x, y = tm.dense_data(8, seed=5)
    probes = fit_probes(validation_split=0.5, validation_data=(x, y))
    assert set().union(*probes) == set(range(40))


def _token_losses(logits, y):
    logits = logits.astype("float64")
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return log_z - picked  # (batch, tokens)


def adapted_lm():
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=1)
    lm.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm


@pytest.mark.parametrize("tokens", ["weighted", "all"])
def test_probe_tokens(tokens):
    lm = adapted_lm()
    x, y, _ = tm.lm_data(batch=4, seq=6)
    x["padding_mask"][:, 4:] = 0  # Two padding tokens per row.
    weights = np.zeros_like(y, dtype="float32")
    weights[:, 2:4] = 1.0  # The "answer": two tokens per row.
    reducer = keras_relora.ReducerCallback(probe_tokens=tokens, seed=0)
    reducer.set_model(lm)
    reducer._loss_fn = probe_loss.loss_function(lm)
    got = reducer._probe_loss(x, y, weights)
    losses = _token_losses(ops.convert_to_numpy(lm.predict_on_batch(x)), y)
    counted = weights if tokens == "weighted" else x["padding_mask"]
    expected = (losses * counted).sum() / counted.sum()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    other = losses.mean() if tokens == "all" else losses[:, :4].mean()
    assert abs(got - other) > 1e-4  # The choice of tokens matters here.


def test_probe_data_of_inputs_alone_is_refused():
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=1)
    lm.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y, w = tm.lm_data()
    before = tm.snapshot(lm)
    reducer = keras_relora.ReducerCallback(probe_data=x, seed=0)
    with pytest.raises(ValueError) as error:
        lm.fit(x, y, sample_weight=w, epochs=1, verbose=0, callbacks=[reducer])
    message = str(error.value)
    assert "`probe_data` takes" in message
    assert "Pass `probe_data=(x, y)`" in message
    assert message.endswith(
        "Received: probe_data=a dict with keys ['padding_mask', 'token_ids']"
    )
    tm.assert_unchanged(lm, before)
    model = adapted_mlp()
    x, y = tm.dense_data(16)
    with pytest.raises(ValueError, match="Received: probe_data=ndarray"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[keras_relora.ReducerCallback(probe_data=x)],
        )


def test_one_callback_on_two_models(tmp_path):
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=2, seed=0)
    x, y = tm.dense_data(32)
    first = adapted_mlp()
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    assert reducer.importance_history[1].shape == (3, NUM_BLOCKS)
    second = adapted_mlp(num_blocks=3)
    second.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[reducer])
    steps, table = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 2, 4, 6, 8])
    assert table.shape == (5, 3)
    np.testing.assert_array_equal(table[-1], reducer.importance)
    np.testing.assert_array_equal(
        reducer.importance, -ops.convert_to_numpy(second.relora_reducer.scores)
    )
    assert reducer.update_counts.sum() == 8 and reducer.train_steps == 8
    pytest.importorskip("matplotlib")
    reducer.plot(str(tmp_path / "importance.png"))


def test_summary(capsys):
    model = adapted_mlp()
    x, y = tm.dense_data(80)
    reducer = keras_relora.ReducerCallback(
        update_layers=1, interval=4, seed=3, verbose=1
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    printed = capsys.readouterr().out
    text = reducer.summary(drop_ratio=0.5, print_fn=lambda _: None)
    assert text in printed  # `verbose` prints it at the end of `fit`.
    assert "B updates: 10 block-steps of 40 without the Reducer (25.0%" in text
    assert "probes: 2 run, 0 skipped" in text
    assert 0 < reducer.probe_seconds < reducer.train_seconds
    share = reducer.probe_seconds / reducer.train_seconds
    assert f"({share:.1%})" in text
    order = np.argsort(-reducer.importance, kind="stable").tolist()
    listed = text.split("most first): ")[1].split("\n")[0]
    assert [int(item.split(" ")[0]) for item in listed.split(", ")] == order
    removed = keras_relora.prune(model, 0.5)
    assert f"would remove the B experts of blocks {removed}" in text
    with pytest.raises(ValueError, match="Received: drop_ratio=2"):
        reducer.summary(drop_ratio=2)


def test_probe_in_the_last_step_of_a_dataset_of_unknown_length():
    # A dataset whose length `fit` cannot know ends each epoch with one
    # more, empty step: on JAX, `fit` takes the model's variables into
    # its state before it finds the data exhausted, and puts back what
    # its state holds. A probe (predict) in the step before left that
    # state without the optimizer's and metrics' variables.
    import tensorflow as tf

    model = adapted_mlp()
    x, y = tm.dense_data(32)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .filter(lambda *_: True)  # Unknown cardinality.
        .batch(8)
    )
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=2, seed=0)
    history = model.fit(dataset, epochs=2, verbose=0, callbacks=[reducer])
    steps, _ = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 2, 4, 6, 8])  # Last steps too.
    assert np.isfinite(history.history["loss"]).all()
    plain = adapted_mlp()
    plain.fit(dataset, epochs=2, verbose=0)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == int(
        ops.convert_to_numpy(plain.optimizer.iterations)
    )
    model.fit(dataset, epochs=1, verbose=0)  # The optimizer state is whole.


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_probe_chunks_give_the_whole_batch_loss(chunk, monkeypatch):
    from keras_relora.reducer import replicas

    lm = adapted_lm()
    x, y, _ = tm.lm_data(batch=7, seq=6)
    weights = np.zeros_like(y, dtype="float32")
    for row in range(7):  # Rows count 1 to 6 tokens: chunks differ.
        weights[row, : 1 + row % 6] = 1.0
    losses = _token_losses(ops.convert_to_numpy(lm.predict_on_batch(x)), y)
    expected = (losses * weights).sum() / weights.sum()
    rows_seen = []
    predict = replicas.predict_batch

    def recording(model, batch):
        rows_seen.append(len(batch["token_ids"]))
        return predict(model, batch)

    monkeypatch.setattr(replicas, "predict_batch", recording)
    reducer = keras_relora.ReducerCallback(probe_chunk_size=chunk, seed=0)
    reducer.set_model(lm)
    reducer._loss_fn = probe_loss.loss_function(lm)
    got = reducer._probe_loss(x, y, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert rows_seen == {1: [1] * 7, 3: [3, 3, 1], None: [7]}[chunk]


@pytest.mark.parametrize("value", [0, -2, 2.5, "4"])
def test_probe_chunk_size_is_checked(value):
    with pytest.raises(ValueError, match="probe_chunk_size"):
        keras_relora.ReducerCallback(probe_chunk_size=value)
