"""Figure 5 at small scale: drop blocks' B by importance or at random.

Trains `relora_multi` (4 routed B experts, shared A) with the
`ReducerCallback` on one of the two real-model benchmarks, with its data,
sizes and settings: `--model minilm` (default; the MiniLM-L6
classification mix of `minilm_tasks.py`, 6 blocks) or `--model smollm2`
(SmolLM2-135M on the tasks of `commonsense.py`, by default sst2 and
arc_easy, scored with OLMo's evaluator, 30 blocks). Then it removes the
B experts of 25/50/75% of the blocks, either
the least important ones by the Reducer's learned importance
(`keras_relora.prune`'s rule) or random blocks (several seeds), evaluates
each, and plots accuracy against the drop ratio for both strategies.

Each configuration is evaluated on the same trained model by setting the
chosen blocks' B kernels to zero and restoring them afterwards: an adapter
with B = 0 adds exactly nothing, which is what `keras_relora.prune` leaves
(the pruned layer returns its base output), and it keeps one compiled
predict function for every configuration. At the end the script applies
the real `keras_relora.prune` at one ratio and checks that it picks the
same blocks and gives the same logits.

Commands:

    KERAS_BACKEND=jax .venv/bin/python benchmarks/drop_ratio.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/drop_ratio.py --quick
    KERAS_BACKEND=jax .venv/bin/python benchmarks/drop_ratio.py \
        --model smollm2 --random-seeds 3

Results go to `drop_ratio_<model>.json` and `.png` in `--output-dir`.
"""

import argparse
import contextlib
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (before keras: thread settings)
import commonsense  # noqa: E402
import finetune  # noqa: E402
import minilm_tasks  # noqa: E402

ROW = ("relora_multi+reducer", "relora_multi", True)
MODELS = ("minilm", "smollm2")
TITLES = {"minilm": "MiniLM-L6", "smollm2": "SmolLM2-135M"}


def model_flag(argv):
    """The `--model` of `argv`: it picks the other flags' defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", choices=MODELS, default="minilm")
    return parser.parse_known_args(argv)[0].model


def parse_args(argv=None):
    model = model_flag(argv)
    all_tasks, sizes = (
        (minilm_tasks.TASKS, minilm_tasks.SIZES)
        if model == "minilm"
        else (commonsense.TASKS, commonsense.SIZES)
    )
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="minilm",
        help="the benchmark whose model, data and sizes "
        "are used (default: minilm)",
    )
    finetune.add_common_args(parser, all_tasks, sizes)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument(
        "--random-seeds",
        type=int,
        default=None,
        help="random drops per ratio (default 5; --quick 2)",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="re-render the report of saved runs' JSON "
        "files (comma-separated: their training seeds are "
        "merged into one table)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args = finetune.finish_args(args, sizes)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    if args.random_seeds is None:
        args.random_seeds = 2 if quick else 5
    return args


def blocks_to_drop(num_blocks, ratio, strategy, importance=None, seed=None):
    """The blocks `keras_relora.prune` removes from an unpruned model."""
    import numpy as np

    count = int(np.floor(ratio * num_blocks + 0.5))
    if strategy == "random":
        chosen = np.random.default_rng(seed).choice(
            num_blocks, count, replace=False
        )
    else:
        chosen = np.argsort(np.asarray(importance), kind="stable")[:count]
    return sorted(int(b) for b in chosen)


def accuracy_with_dropped(bench, model, blocks, data):
    """Evaluates with the B kernels of `blocks` at zero, then restores.

    Returns the bench's result fields: `accuracy` (`{task: fraction}`),
    and for SmolLM2 also the held-out `ce_loss` per task."""
    with dropped(model, blocks):
        return bench.evaluate(model, data)


@contextlib.contextmanager
def dropped(model, blocks):
    """The B kernels of `blocks`' adapters at zero inside the block."""
    import numpy as np

    import keras_relora

    saved = []
    for adapter in keras_relora.get_state(model).adapters.values():
        if adapter.block in blocks:
            saved.append((adapter.b_kernel, _numpy(adapter.b_kernel)))
            adapter.b_kernel.assign(np.zeros_like(saved[-1][1]))
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


def _numpy(variable):
    import keras

    return keras.ops.convert_to_numpy(variable.value).copy()


def average(accuracy):
    return float(sum(accuracy.values()) / len(accuracy))


class MiniLMBench:
    """`minilm_tasks.py`'s encoder, data, training and evaluation."""

    def __init__(self, args):
        from relora_offline import minilm

        self.args = args
        self.backbone = minilm.load_minilm_backbone()
        self.preprocessor = minilm.load_minilm_preprocessor(
            args.sequence_length
        )

    def data(self, seed):
        return minilm_tasks.build_data(self.args, self.preprocessor, seed)

    def train(self, seed, data):
        """`(result dict, trained model)`."""
        return minilm_tasks.train_row(ROW, seed, data, self.args, self.backbone)

    def evaluate(self, model, data):
        return {
            "accuracy": minilm_tasks.evaluate(
                model, data["test"], self.args.eval_batch_size
            )
        }

    def check_logits(self, model, data):
        """Logits of the first task's test inputs (traced afresh)."""
        x, _ = data["test"][self.args.tasks[0]]
        model.predict_function = None
        return model.predict(x, batch_size=self.args.eval_batch_size, verbose=0)

    def test_sizes(self, data):
        return {t: len(data["test"][t][1]) for t in self.args.tasks}

    def release(self, model):
        minilm_tasks.release_row(model, self.backbone)


class SmolLM2Bench:
    """`commonsense.py`'s causal LM, data, training and evaluation (OLMo's
    evaluator: `acc` of the held-out documents)."""

    def __init__(self, args):
        self.args = args
        self.lm, self.tasks = commonsense.load_model(args)

    def data(self, seed):
        return commonsense.build_data(self.args, self.tasks, seed)

    def train(self, seed, data):
        result = commonsense.train_row(ROW, seed, self.lm, data, self.args)
        return result, self.lm

    def evaluate(self, model, data):
        scored = commonsense.metrics(model, data, self.args)
        return {k: scored[k] for k in ("accuracy", "ce_loss")}

    def check_logits(self, model, data):
        """Final hidden states of 8 training sequences (traced afresh)."""
        import keras

        batch = {k: v[:8] for k, v in data["train"][0].items()}
        model.backbone.predict_function = None
        return keras.ops.convert_to_numpy(
            model.backbone.predict_on_batch(batch)
        )

    def test_sizes(self, data):
        return {t: len(v) for t, v in data["test"].items()}

    def release(self, model):
        import keras_relora

        keras_relora.unload(model)
        gc.collect()


BENCHES = {"minilm": MiniLMBench, "smollm2": SmolLM2Bench}


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        return render(args.from_json, append=not args.no_append)
    common.pin_threads_env(args.threads)
    import numpy as np

    import keras_relora

    common.pin_threads_runtime(args.threads)

    start = time.perf_counter()
    env = common.environment(args.threads)
    bench = BENCHES[args.model](args)
    runs = []
    for seed in args.seeds:
        data = bench.data(seed)
        trained, model = bench.train(seed, data)
        importance = np.asarray(trained["importance"])
        num_blocks = keras_relora.get_state(model).num_blocks
        run = {
            "seed": seed,
            "trained": trained,
            "num_blocks": num_blocks,
            "points": [],
        }
        print(
            f"[seed {seed}] trained: avg {100 * trained['average']:.1f}, "
            f"importance {np.round(importance, 4).tolist()}",
            flush=True,
        )
        for ratio in args.ratios:
            configs = [("importance", None)] + [
                ("random", s) for s in range(args.random_seeds)
            ]
            for strategy, drop_seed in configs:
                blocks = blocks_to_drop(
                    num_blocks, ratio, strategy, importance, drop_seed
                )
                fields = accuracy_with_dropped(bench, model, blocks, data)
                accuracy = fields["accuracy"]
                run["points"].append(
                    {
                        "ratio": ratio,
                        "strategy": strategy,
                        "drop_seed": drop_seed,
                        "blocks": blocks,
                        **fields,
                        "average": average(accuracy),
                    }
                )
                print(
                    f"  drop {ratio:.2f} {strategy:<10} seed {drop_seed} "
                    f"blocks {blocks}: avg "
                    f"{100 * average(accuracy):.1f}",
                    flush=True,
                )
        run["prune_check"] = prune_check(bench, model, data, run)
        print(f"  prune check: {run['prune_check']}", flush=True)
        runs.append(run)
        bench.release(model)
        del model
    total = time.perf_counter() - start
    payload = {
        "settings": vars(args),
        "environment": env,
        "runs": runs,
        "total_seconds": total,
        "command": finetune.command_line(),
        "test_sizes": bench.test_sizes(data),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"drop_ratio_{args.model}.json")
    common.write_json(path, payload)
    render(path, append=not args.no_append)
    return payload


def prune_check(bench, model, data, run):
    """Real `keras_relora.prune` at the middle ratio vs the B = 0 result."""
    import numpy as np

    import keras_relora

    ratios = bench.args.ratios
    ratio = ratios[len(ratios) // 2]
    point = next(
        p
        for p in run["points"]
        if p["ratio"] == ratio and p["strategy"] == "importance"
    )
    with dropped(model, point["blocks"]):
        zeroed = bench.check_logits(model, data)
    pruned_blocks = keras_relora.prune(model, ratio)
    pruned = bench.check_logits(model, data)  # The variables changed.
    return {
        "ratio": ratio,
        "same_blocks": pruned_blocks == point["blocks"],
        "max_abs_logit_difference": float(np.max(np.abs(pruned - zeroed))),
    }


def merge_runs(payload, payloads):
    """Joins runs of other training seeds: their runs concatenated."""
    payload["runs"] = [r for p in payloads for r in p["runs"]]
    payload["settings"]["seeds"] = [r["seed"] for r in payload["runs"]]


def render(paths, append):
    payload, path = finetune.load_runs(paths, merge_runs)
    args = argparse.Namespace(**payload["settings"])
    table, curves = summary(payload)
    print("\n" + table)
    plot = plot_curves(os.path.splitext(path)[0] + ".png", curves, args)
    return finetune.publish(payload, table, plot, report_markdown, append)


def summary(payload):
    """Table rows per ratio; curves {strategy: (ratios, means, stds)}."""
    import numpy as np

    ratios = [0.0] + list(payload["settings"]["ratios"])
    values = {(r, s): [] for r in ratios for s in ("importance", "random")}
    for run in payload["runs"]:
        for s in ("importance", "random"):
            values[(0.0, s)].append(run["trained"]["average"])
        for p in run["points"]:
            values[(p["ratio"], p["strategy"])].append(p["average"])
    rows, curves = [], {"importance": ([], [], []), "random": ([], [], [])}
    for r in ratios:
        imp, rnd = values[(r, "importance")], values[(r, "random")]
        rows.append(
            [
                f"{r:.2f}",
                finetune.fmt_pct(imp),
                finetune.fmt_pct(rnd) + f" (n={len(rnd)})",
                f"{100 * min(rnd):.1f}..{100 * max(rnd):.1f}",
                f"{100 * (np.mean(imp) - np.mean(rnd)):+.1f}",
            ]
        )
        for s, v in (("importance", imp), ("random", rnd)):
            curves[s][0].append(r)
            curves[s][1].append(100 * float(np.mean(v)))
            curves[s][2].append(
                100 * float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            )
    headers = [
        "drop ratio",
        "by importance",
        "random (mean ± std)",
        "random min..max",
        "importance - random",
    ]
    return common.markdown_table(headers, rows), curves


def plot_curves(path, curves, args):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for strategy, (ratios, means, stds) in curves.items():
        ax.errorbar(
            ratios,
            means,
            yerr=stds,
            marker="o",
            capsize=4,
            label=f"drop by {strategy}",
        )
    ax.set_xlabel("fraction of blocks whose B is dropped")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(
        f"{TITLES[model_of(args)]}, relora_multi + Reducer, seeds {args.seeds}",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def model_of(settings):
    """The run's `--model` (runs saved before the flag had MiniLM)."""
    return getattr(settings, "model", "minilm")


def report_markdown(payload, table, plot):
    args = argparse.Namespace(**payload["settings"])
    model = model_of(args)
    checks = [run["prune_check"] for run in payload["runs"]]
    importances = [
        [round(v, 4) for v in run["trained"]["importance"]]
        for run in payload["runs"]
    ]
    blocks = payload["runs"][0]["num_blocks"]
    counts = ", ".join(
        f"{int(100 * r)}% -> {int(r * blocks + 0.5)}" for r in args.ratios
    )
    trained_as = {"minilm": "`minilm_tasks.py`", "smollm2": "`commonsense.py`"}[
        model
    ]
    plot_line = finetune.plot_line(plot)
    return (
        f"## Drop ratio (Figure 5) on {TITLES[model]} (`drop_ratio.py`), "
        f"{finetune.utc_now()}\n\n"
        f"- command{'s' if '`; `' in payload['command'] else ''}: "
        f"`{payload['command']}`\n"
        f"{finetune.environment_lines(payload['environment'])}\n"
        f"- model: relora_multi (4 experts, rank {args.rank}) + "
        f"ReducerCallback (interval {args.interval}, update_layers "
        f"{max(1, blocks // 4)} of {blocks} blocks), trained as in "
        f"{trained_as}: {args.steps} steps x {args.batch_size} x "
        f"{args.sequence_length} tokens, AdamW lr {args.learning_rate}, "
        f"training seeds {args.seeds}; test examples per task "
        f"{payload['test_sizes']}\n"
        f"- dropping: `round(ratio * {blocks})` blocks (halves up: "
        f"{counts} of {blocks}) lose their B; by importance = the least "
        f"important by the Reducer's learned importance; random = "
        f"{args.random_seeds} random draws per ratio and training seed; "
        f"evaluated with those B kernels set to zero (exactly what `prune` "
        f"leaves); check with the real `keras_relora.prune`: {checks}\n"
        f"- learned importance (per block, per training seed): "
        f"{importances}\n"
        f"- cells: average accuracy % over the {len(args.tasks)} tasks; "
        f"ratio 0 is the trained model without dropping\n"
        + (
            "- scoring: OLMo's evaluator (`olmo_eval.ICLMetric` `acc` via "
            "`relora_offline.olmo_scorer`, log-likelihood of each answer "
            "continuation); each point's JSON also holds the held-out "
            "ce_loss per gold continuation token\n"
            if model == "smollm2"
            else ""
        )
        + f"- total wall time {payload['total_seconds'] / 60:.1f} min\n"
        f"{plot_line}\n{table}\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
