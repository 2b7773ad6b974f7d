"""The main job on a float, an int8 and an int4 base: memory, step time and
held-out accuracy, on this process's backend (`KERAS_BACKEND`).

Each base runs the main job (`examples/llama3_commonsense.py`) in its own
child process, one after another, with the same seed, training rows and
held-out documents; `--quantize int8|int4` quantizes the base's kernels
with Keras (`backbone.quantize`) before the adapters are added. Per base:

* weights: the bytes of the adapted model's variables as stored (int8 and
  packed int4 kernels with their scales, plus the float adapters);
* the resident set when `fit` starts and its peak during `fit` (`VmHWM`,
  reset at the start), and the peak's growth over the start;
* the median train step (the first, which compiles, left out), and its
  ratio to the float base's (the bases run one after another: the ratio
  is indicative on a shared machine);
* held-out accuracy of the task mix before training (the quantized base
  alone) and after, with the change's 95% paired bootstrap interval.

Arguments after `--` go to every main-job run (e.g. `-- --steps 20
--test-per-task 50`, or `-- --tiny` for a smoke run).

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/quantized_base.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/quantized_base.py \\
        --model gemma3 -- --steps 30
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import finetune  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(
    os.path.dirname(HERE), "examples", "llama3_commonsense.py"
)
BASES = ("float", "int8", "int4")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--bases",
        default=",".join(BASES),
        help="comma-separated bases of %(default)s",
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="the main job's --model (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--output-dir", default=os.path.join("outputs", "quantized_base")
    )
    parser.add_argument(
        "--no-append", action="store_true", help="do not append to RESULTS.md"
    )
    args = parser.parse_args(argv)
    args.bases = [b for b in args.bases.split(",") if b]
    unknown = sorted(set(args.bases) - set(BASES))
    if unknown or not args.bases:
        parser.error(
            f"--bases takes {', '.join(BASES)}. Received: {unknown or '(none)'}"
        )
    if "--tiny" in passthrough and args.model != "smollm2":
        parser.error("--tiny picks its own model: leave --model out")
    args.passthrough = passthrough
    return args


def main_job_argv(base, args):
    """The main job's command line for one base."""
    argv = [sys.executable, EXAMPLE]
    if "--tiny" not in args.passthrough:
        argv += ["--model", args.model]
    argv += ["--output-dir", os.path.join(args.output_dir, base)]
    if base != "float":
        argv += ["--quantize", base]
    return argv + args.passthrough


def run_base(base, args):
    """Runs the main job on `base`; returns its row (results.json's fields)."""
    argv = main_job_argv(base, args)
    print(f"[{base}] {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    # The thread settings of `main` are in the environment the child gets.
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    path = os.path.join(args.output_dir, base, "results.json")
    if done.returncode != 0 or not os.path.exists(path):
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(
            f"The main job failed on the {base} base (exit code "
            f"{done.returncode}): its output is above."
        )
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    return row_of(base, results, seconds)


def row_of(base, results, seconds):
    """One table row from a main job's `results.json`."""
    start = results.get("rss_fit_start_mib")
    peak = results.get("rss_fit_peak_mib")
    change, low, high = results["change"]
    return {
        "base": base,
        "weights_mib": results["weights_mib"],
        "rss_fit_start_mib": start,
        "rss_fit_peak_mib": peak,
        "fit_growth_mib": None if start is None else peak - start,
        "median_step_s": results["median_step_s"],
        "accuracy_before": results["accuracy_before"]["all"],
        "accuracy_after": results["accuracy_after"]["all"],
        "change": [change, low, high],
        "num_test": results["num_test"]["all"],
        "steps": results["steps"],
        "seconds": seconds,
    }


def table(rows):
    """The markdown table: steps as ratios to the float base's (if run)."""
    float_step = next(
        (r["median_step_s"] for r in rows if r["base"] == "float"), None
    )

    def mib(value):
        return "" if value is None else f"{value:,.0f}"

    lines = []
    for r in rows:
        step = f"{1e3 * r['median_step_s']:,.0f}"
        if float_step and r["base"] != "float":
            step += f" ({r['median_step_s'] / float_step:.2f}x)"
        change, low, high = (100 * v for v in r["change"])
        lines.append(
            [
                r["base"],
                f"{r['weights_mib']:,.1f}",
                mib(r["rss_fit_start_mib"]),
                mib(r["rss_fit_peak_mib"]),
                mib(r["fit_growth_mib"]),
                step,
                f"{100 * r['accuracy_before']:.1f}%",
                f"{100 * r['accuracy_after']:.1f}%",
                f"{change:+.1f} [{low:+.1f}, {high:+.1f}]",
            ]
        )
    return common.markdown_table(
        [
            "base",
            "weights (MiB)",
            "RSS at fit start (MiB)",
            "peak in fit (MiB)",
            "growth in fit (MiB)",
            "median step (ms)",
            "held-out before",
            "held-out after",
            "change (points, 95% CI)",
        ],
        lines,
    )


def main(argv=None):
    args = parse_args(argv)
    common.pin_threads_env(args.threads)
    import keras

    env = common.environment(args.threads)
    rows = [run_base(base, args) for base in args.bases]
    markdown = table(rows)
    print(markdown)
    payload = {
        "environment": env,
        "command": " ".join(["benchmarks/quantized_base.py", *sys.argv[1:]]),
        "model": args.model,
        "rows": rows,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    common.write_json(
        os.path.join(args.output_dir, "quantized_base.json"), payload
    )
    if not args.no_append:
        finetune.append_section(
            f"## Quantized bases (`quantized_base.py`), "
            f"{keras.config.backend()}, {finetune.utc_now()}\n\n"
            f"Command: `KERAS_BACKEND={keras.config.backend()} "
            f"{payload['command']}`, environment "
            f"`{json.dumps(env)}`.\n\n{markdown}\n"
        )
    return payload


if __name__ == "__main__":
    main()
