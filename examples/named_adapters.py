"""Two task adapters on one SmolLM2-135M: train, score, combine, route, save.

1. load SmolLM2-135M-Instruct offline (as the main job,
   `examples/llama3_commonsense.py`) and build its two tasks, SST-2 and
   ARC-Easy, with OLMo's evaluator: the same seeded train and held-out
   documents as the main job;
2. `enable_relora(..., adapter_name=task)` once per task, then for each:
   `set_adapter`, `fit` on that task's rows (`fit` trains the active
   adapter alone: the other stays bitwise as it was);
3. `combine_adapters`: a third adapter, the weighted sum of the two;
4. score each task's held-out documents with OLMo's `ICLMetric` under the
   base model (`disable_adapters`), its own adapter, the other task's and
   the combination, and print the table;
5. serve one batch whose examples each go through their own adapter
   (`route_examples`) and check it against each adapter alone;
6. save one file per adapter, load them into a fresh model, compare.

    python examples/named_adapters.py            # SmolLM2, the main job's sizes
    python examples/named_adapters.py --tiny     # tiny random Llama, seconds
"""

import argparse
import contextlib
import os
import time

import keras
import numpy as np

import keras_relora
from relora_offline import main_job
from relora_offline import main_job_data
from relora_offline import olmo_data
from relora_offline import olmo_scorer

TASKS = ("sst2", "arc_easy")
COLUMNS = ("base", "own", "other", "combined")  # of the table
# Sizes, as flags: (the default, on SmolLM2 as the main job; `--tiny`).
SIZES = {
    "train_per_task": (250, 8),
    "test_per_task": (200, 4),
    "steps": (60, 2),  # per adapter
    "batch_size": (8, 4),
    "sequence_length": (48, 64),
    "eval_batch_size": (32, 8),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds (CI)")
    for name, (full, tiny) in SIZES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, help=f"{full}; --tiny: {tiny}")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--combine-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/named_adapters")
    args = parser.parse_args(argv)
    for name, sizes in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, sizes[args.tiny])
    return args


def load_model(args):
    """The causal LM, and its tokenizer as OLMo's evaluator takes it."""
    keras.utils.set_random_seed(args.seed)  # The tiny model's weights.
    if args.tiny:
        lm = main_job.tiny_causal_lm(args.sequence_length)
        tokenizer = lm.preprocessor.tokenizer
        tokenizer = olmo_data.keras_hub_tokenizer(
            tokenizer, pad_token_id=tokenizer.pad_token_id or 0
        )
    else:
        from relora_offline.smollm2 import load_smollm2

        lm = load_smollm2(sequence_length=args.sequence_length)
        tokenizer = olmo_data.smollm2_tokenizer()
    lm.preprocessor = None  # The inputs are token ids already.
    return lm, tokenizer


def task_data(name, index, tokenizer, args):
    """The main job's seeded documents of a task: `(task, training rows,
    held-out documents)`, the rows `steps` batches of the gold answers."""
    task = olmo_data.build_task(name, tokenizer)
    train_ids, test_ids = olmo_data.split_documents(
        task, args.train_per_task, args.test_per_task, seed=args.seed + index
    )
    x, y, w = olmo_data.gold_training_arrays(
        task, train_ids, args.sequence_length, tokenizer.pad_token_id
    )
    order = main_job_data.mixed_order(  # Seeded passes over the rows.
        np.zeros(len(y)), args.steps, args.batch_size, args.seed
    )
    rows = ({k: v[order] for k, v in x.items()}, y[order], w[order])
    return task, rows, test_ids


@contextlib.contextmanager
def using(lm, adapter):
    """`lm` with `adapter` active; None: with none (the base model)."""
    if adapter is None:
        with keras_relora.disable_adapters(lm):
            yield
    else:
        keras_relora.set_adapter(lm, adapter)  # No retrace: one variable.
        yield


def max_diff(a, b):
    return float(np.max(np.abs(a - b)))


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    lm, tokenizer = load_model(args)
    data = {t: task_data(t, i, tokenizer, args) for i, t in enumerate(TASKS)}

    # 1. One adapter per task (the first one added stays active), each
    # trained in turn on its task.
    for name in TASKS:
        lm.enable_relora(rank=args.rank, experts=1, adapter_name=name)
    lm.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for name in TASKS:
        keras_relora.set_adapter(lm, name)
        x, y, w = data[name][1]
        history = lm.fit(  # The rows are in a seeded order already.
            x,
            y,
            sample_weight=w,
            batch_size=args.batch_size,
            shuffle=False,
            verbose=0,
        )
        loss = history.history["loss"][-1]
        print(f"trained {name!r}: {args.steps} steps, loss {loss:.4f}")

    # 2. A third adapter: base + w * delta_sst2 + w * delta_arc_easy.
    weights = {name: args.combine_weight for name in TASKS}
    keras_relora.combine_adapters(lm, weights, "combined")
    print(f"adapters: {keras_relora.adapter_names(lm)}")

    # 3. Each task's held-out documents under each setting.
    logits_fn = olmo_scorer.keras_logits_fn(lm)  # Built after the adapters.
    scores = {}
    for name, (task, _, test_ids) in data.items():
        other = [t for t in TASKS if t != name][0]
        scores[name] = {}
        adapters = (None, name, other, "combined")  # The columns' adapters.
        for column, adapter in zip(COLUMNS, adapters, strict=True):
            with using(lm, adapter):
                scores[name][column] = olmo_scorer.score_task(
                    logits_fn, task, test_ids, args.eval_batch_size
                )
    print(
        f"\nheld-out accuracy (OLMo's ICLMetric), {args.test_per_task} "
        "documents per task; own = the task's adapter"
    )
    print(f"  {'task':<10}" + "".join(f"{c:>10}" for c in COLUMNS))
    for name, row in scores.items():
        cells = "".join(f"{s.correct.mean():>10.1%}" for s in row.values())
        print(f"  {name:<10}{cells}")

    # 4. One batch, each example through its own adapter (None: the base).
    ids = ["sst2", "sst2", "arc_easy", None]
    length, pad = args.sequence_length, tokenizer.pad_token_id
    rows = [  # Two held-out documents of each task (context + answer).
        olmo_data.gold_training_arrays(task, test[:2], length, pad)[0]
        for task, _, test in data.values()
    ]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    with keras_relora.route_examples(lm, ids):
        routed = lm.predict(batch, batch_size=len(ids), verbose=0)
    alone = {}  # The whole batch through one adapter (or none).
    for adapter in (*TASKS, None):
        with using(lm, adapter):
            alone[adapter] = lm.predict(batch, verbose=0)
    routing = max(max_diff(routed[i], alone[a][i]) for i, a in enumerate(ids))
    print(f"\nrouted batch {ids}: max |routed - adapter alone| = {routing:.3g}")

    # 5. One file per adapter; a fresh model loads them by name.
    paths, reload = {}, {}
    fresh, _ = load_model(args)
    for adapter in keras_relora.adapter_names(lm):
        paths[adapter] = os.path.join(args.output_dir, f"{adapter}.safetensors")
        keras_relora.save_relora_weights(
            lm, paths[adapter], adapter_name=adapter
        )
        keras_relora.load_relora_weights(
            fresh, paths[adapter], adapter_name=adapter
        )
    for adapter in paths:
        with using(lm, adapter), using(fresh, adapter):
            reload[adapter] = max_diff(
                fresh.predict(batch, verbose=0), lm.predict(batch, verbose=0)
            )
    print(f"reloaded in a fresh model, max |difference| per adapter: {reload}")
    print(f"files: {', '.join(paths.values())}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return dict(
        scores=scores,
        routed=routed,
        alone=alone,
        ids=ids,
        batch=batch,
        reload=reload,
        paths=paths,
    )


if __name__ == "__main__":
    main()
