"""`ReducerCallback` on a keras-hub task (a tiny Llama 3 causal LM)."""

import keras
import numpy as np
import pytest
import tiny_models
from keras import ops

import keras_relora


def test_llama_fit_30_steps_one_trace_and_frozen_blocks():
    keras.utils.set_random_seed(0)
    lm = tiny_models.llama3_causal_lm(num_layers=2)
    lm.enable_relora(rank=2, experts=2)
    lm.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    counts = {"train": 0, "predict": 0}
    for kind in counts:
        original = getattr(lm, f"{kind}_step")

        def counting(*args, _original=original, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _original(*args, **kwargs)

        object.__setattr__(lm, f"{kind}_step", counting)

    state = keras_relora.get_state(lm)
    assert state.num_blocks == 2
    kernels = {
        path: adapter.b_kernel for path, adapter in state.adapters.items()
    }
    updated = {path: 0 for path in kernels}

    class CountUpdates(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            _ = self.model  # Syncs the JAX state.
            self.before = {
                p: ops.convert_to_numpy(v).copy() for p, v in kernels.items()
            }

        def on_train_batch_end(self, batch, logs=None):
            _ = self.model
            changed = {
                p: not np.array_equal(self.before[p], ops.convert_to_numpy(v))
                for p, v in kernels.items()
            }
            blocks = {state.adapters[p].block for p, c in changed.items() if c}
            assert len(blocks) == 1  # K = 1: one block's B moved.
            for p, c in changed.items():
                updated[p] += c

    x, y, sample_weight = tiny_models.lm_data(batch=60, seq=6)
    reducer = keras_relora.ReducerCallback(update_layers=1, seed=0)
    lm.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=2,
        epochs=1,
        verbose=0,
        callbacks=[reducer, CountUpdates()],
    )

    if keras.config.backend() in ("jax", "tensorflow"):
        assert counts == {"train": 1, "predict": 1}
    steps, table = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])
    assert np.any(table[-1] != 0)
    # Each probe draws 16 random rows of the training data.
    probe = reducer._probe[0]["token_ids"]
    assert len({tuple(row) for row in probe}) == 16
    training = {tuple(row) for row in x["token_ids"]}
    assert all(tuple(row) in training for row in probe)
    # Every layer of a block moved exactly when its block was sampled.
    by_block = {}
    for path, count in updated.items():
        by_block.setdefault(state.adapters[path].block, set()).add(count)
    assert all(len(counts) == 1 for counts in by_block.values())
    assert sum(next(iter(c)) for c in by_block.values()) == 30


@pytest.mark.parametrize("container", ["numpy", "list"])
def test_llama_with_preprocessor_probes_raw_strings(container):
    # The task preprocesses the strings `fit` gets; the probe batch, taken
    # from the same strings, must be preprocessed once, not twice (a task's
    # own `test_on_batch` preprocesses again).
    keras.utils.set_random_seed(0)
    lm = tiny_models.llama3_causal_lm_with_preprocessor(
        tiny_models.byte_tokenizer(), sequence_length=8
    )
    backbone, preprocessor = lm.backbone, lm.preprocessor
    base = {v.path: ops.convert_to_numpy(v).copy() for v in backbone.weights}
    lm.enable_relora(rank=2, experts=2)
    lm.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "red", "big", "top"]
    texts = np.array([" ".join(rng.choice(words, 3)) for _ in range(24)])
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=4, seed=0)
    data = texts if container == "numpy" else texts.tolist()
    history = lm.fit(
        data, batch_size=2, epochs=1, verbose=0, callbacks=[reducer]
    )

    steps, table = reducer.importance_history
    np.testing.assert_array_equal(steps, [0, 4, 8, 12])
    assert np.all(np.isfinite(table))
    assert np.any(table[-1] != 0)  # The probes moved the scores.
    assert np.isfinite(history.history["loss"][-1])
    # The third probe's batch: its 16 strings, preprocessed once.
    rows = reducer._probes.rows(2)
    assert len(set(rows.tolist())) == 16
    expected, _, _ = keras.utils.unpack_x_y_sample_weight(
        preprocessor(texts[rows].tolist())
    )
    np.testing.assert_array_equal(
        reducer._probe[0]["token_ids"],
        ops.convert_to_numpy(expected["token_ids"]),
    )
    _ = lm.weights  # On JAX, syncs the state.
    for variable in backbone.weights:
        if variable.path in base:
            np.testing.assert_array_equal(
                ops.convert_to_numpy(variable), base[variable.path]
            )
    # The adapters trained.
    state = keras_relora.get_state(lm)
    assert any(
        np.any(ops.convert_to_numpy(adapter.b_kernel) != 0)
        for adapter in state.adapters.values()
    )


def test_llama_probe_loss_is_the_mean_loss_per_target_token(monkeypatch):
    # The probe loss is sum(cross-entropy * weight) / sum(weight) over the
    # probe batch's tokens, with the sampled blocks suppressed. Independent
    # reference: numpy's log-softmax cross-entropy of the model's logits,
    # with the suppressed blocks' B scaled by the suppression factor (the
    # adapter output is linear in B). Only the last 2 of 6 tokens carry
    # weight, as answer tokens do: Keras's own loss would be 3x smaller.
    from keras_relora.reducer import block_sampling

    keras.utils.set_random_seed(0)
    lm = tiny_models.llama3_causal_lm(num_layers=3)
    lm.enable_relora(rank=2, experts=2)
    lm.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    adapters = list(keras_relora.get_state(lm).adapters.values())
    rng = np.random.default_rng(2)
    for adapter in adapters:
        adapter.b_kernel.assign(
            rng.normal(size=adapter.b_kernel.shape).astype("float32")
        )
    x, y, _ = tiny_models.lm_data(batch=8, seq=6)
    weights = np.zeros(y.shape, "float32")
    weights[:, -2:] = 1.0
    calls = []
    update_scores = block_sampling.update_scores

    def spy(scores, suppressed, losses, score_lr):
        calls.append((np.array(suppressed), list(losses)))
        return update_scores(scores, suppressed, losses, score_lr)

    monkeypatch.setattr(block_sampling, "update_scores", spy)
    reducer = keras_relora.ReducerCallback(
        update_layers=1, suppress_layers=1, interval=2, trials=3, seed=1
    )
    lm.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=2,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[reducer],
    )
    assert len(calls) == 2  # Probes at steps 2 and 4.
    # The last probe ran on the final weights, with all 8 rows (fewer
    # than `probe_batch_size`; the loss does not depend on their order).
    suppressed, losses = calls[-1]
    rows = slice(None)
    trained = [ops.convert_to_numpy(a.b_kernel).copy() for a in adapters]
    for blocks, loss in zip(suppressed, losses, strict=False):
        for adapter, b in zip(adapters, trained, strict=False):
            factor = 0.25 if adapter.block in blocks else 1.0
            adapter.b_kernel.assign(b * factor)
        batch = {key: value[rows] for key, value in x.items()}
        logits = ops.convert_to_numpy(lm(batch)).astype("float64")
        top = logits.max(-1, keepdims=True)
        log_p = (
            logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        )
        ce = -np.take_along_axis(log_p, y[rows][..., None], -1)[..., 0]
        expected = (ce * weights[rows]).sum() / weights[rows].sum()
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert len({round(loss, 6) for loss in losses}) > 1
