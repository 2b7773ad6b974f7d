"""The main job's training model: logits and loss at the answer tokens only.

`causal_lm_logits.position_logits_model` projects onto the vocabulary only
at the positions `weighted_positions` keeps; checked against the
`CausalLM`'s own full logits (the reference), and with the Reducer.
"""

import keras
import numpy as np
import pytest
import tiny_models as tm

import keras_relora
from relora_offline import causal_lm_logits

pytest.importorskip("keras_hub")


def _full_arrays(seed=0):
    """Rows of 10 tokens, padded on the right, with 1-4 weighted answer
    tokens at the end of each row (and a row with one)."""
    x = tm.token_batch(batch=4, seq=10, seed=seed)
    lengths = np.array([10, 8, 6, 9])
    answers = np.array([4, 1, 2, 3])
    x["padding_mask"] = (np.arange(10)[None] < lengths[:, None]).astype("int32")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 32, (4, 10)).astype("int32")
    weight = np.zeros((4, 10), "float32")
    for i, (n, a) in enumerate(zip(lengths, answers, strict=True)):
        weight[i, n - a : n] = 1.0
    return x, y, weight


def _log_softmax(logits):
    logits = logits.astype("float64")
    peak = logits.max(-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def test_weighted_positions_keeps_the_weighted_tokens_in_order():
    y = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    weight = np.array([[0, 1, 0, 2], [0, 0, 0, 0.5]], "float32")
    positions, targets, weights = causal_lm_logits.weighted_positions(y, weight)
    np.testing.assert_array_equal(positions, [[1, 3], [3, 0]])
    np.testing.assert_array_equal(targets, [[6, 8], [4, 0]])
    np.testing.assert_array_equal(weights, [[1, 2], [0.5, 0]])
    positions, _, weights = causal_lm_logits.weighted_positions(y, weight, 3)
    assert positions.shape == (2, 3) and weights[:, 2].tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"more than `width`=1\. Pass width"):
        causal_lm_logits.weighted_positions(y, weight, width=1)
    with pytest.raises(ValueError, match=r"Received: y.shape=\(2, 4\)"):
        causal_lm_logits.weighted_positions(y, weight[:, :3])


def test_position_logits_are_the_causal_lm_logits_at_those_positions():
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(lm)
    x, y, weight = _full_arrays()
    positions, targets, weights = causal_lm_logits.weighted_positions(y, weight)
    assert positions.shape == (4, 4)
    model = causal_lm_logits.position_logits_model(lm)
    got = keras.ops.convert_to_numpy(model({**x, "positions": positions}))
    full = keras.ops.convert_to_numpy(lm(x))
    want = np.take_along_axis(full, positions[:, :, None], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The same answer-token loss as on the full arrays.
    full_nll = -np.take_along_axis(_log_softmax(full), y[:, :, None], 2)[..., 0]
    nll = -np.take_along_axis(_log_softmax(got), targets[:, :, None], 2)[..., 0]
    np.testing.assert_allclose(
        (nll * weights).sum() / weights.sum(),
        (full_nll * weight).sum() / weight.sum(),
        rtol=1e-5,
    )
    assert keras_relora.get_state(model) is keras_relora.get_state(lm)


def test_fitting_it_trains_the_causal_lm_adapters_with_the_reducer():
    lm = tm.llama3_causal_lm(num_layers=4)
    lm.enable_relora(rank=2, experts=2)
    state = keras_relora.get_state(lm)
    model = causal_lm_logits.position_logits_model(lm)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        run_eagerly=keras.config.backend() == "tensorflow",
    )
    x, y, weight = _full_arrays()
    positions, targets, weights = causal_lm_logits.weighted_positions(y, weight)
    x = {**x, "positions": positions}
    before = tm.snapshot(lm)
    reducer = keras_relora.ReducerCallback(
        update_layers=1,
        interval=1,
        probe_data=(x, targets, weights),
        probe_batch_size=4,
        seed=0,
        log_importance=False,
    )
    model.fit(
        x,
        targets,
        sample_weight=weights,
        batch_size=4,
        epochs=3,
        callbacks=[reducer],
        verbose=0,
    )
    after = tm.snapshot(lm)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and changed <= set(state.variables())
    assert any("b_kernel" in p for p in changed)
    # The Reducer probed and scored the CausalLM's blocks.
    assert reducer.importance.shape == (4,)
    assert not np.allclose(reducer.importance, reducer.importance[0])


def test_scoring_models_run_once_per_call_without_an_eager_build():
    """The scoring models add no weights to the `CausalLM`: built from the
    start, their first `predict_on_batch` runs `call` once (the trace, or
    torch's eager run), not first an eager pass to build them (on JAX an
    op-by-op run that compiles every op)."""
    lm = tm.llama3_causal_lm()
    logits = causal_lm_logits.KerasLogits(lm)
    calls = []
    for model in (logits._sequence_model, *logits._context_models.values()):
        assert model.built
        original = model.call
        model.call = lambda inputs, original=original: (
            calls.append(1) or original(inputs)
        )
    x = tm.token_batch(batch=2, seq=8, seed=0)
    positions = np.array([[7, 3], [5, 6]], "int32")
    got = logits(x["token_ids"], x["padding_mask"], positions)
    assert len(calls) == 1
    full = keras.ops.convert_to_numpy(lm(x))
    np.testing.assert_allclose(
        got, np.take_along_axis(full, positions[:, :, None], 1), atol=1e-5
    )
    context_mask = np.ones((2, 8), "int32")
    logits.context_logits(x["token_ids"], context_mask, None, None, None)
    assert len(calls) == 2
    rows = x["token_ids"][:, :3]
    logits.context_logits(
        x["token_ids"], context_mask, rows, np.array([0, 1]), rows
    )
    assert len(calls) == 3
