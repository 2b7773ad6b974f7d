"""Shared helpers of the fine-tuning benchmarks (accuracy, not speed).

Used by `commonsense.py` (SmolLM2-135M), `minilm_tasks.py` (MiniLM-L6) and
`drop_ratio.py`: their common arguments, the variant list, a peak-memory
sampler, seed summaries, markdown tables, bar plots and appending a section
to `RESULTS.md`.
Import `benchmarks.common` (thread pinning) before keras; nothing here
imports keras or a backend at module level.
"""

import contextlib
import datetime
import json
import os
import resource
import shlex
import statistics
import sys
import threading
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_PATH = os.path.join(HERE, "RESULTS.md")

# The benchmark's rows: (name, `keras_relora.VARIANTS` key, Reducer on?).
# `VARIANTS["relora"]` has the same adapters as `sharelora` (a shared A and
# one B per layer); what makes it the paper's ReLoRA is the Reducer, so the
# `relora` row trains with `ReducerCallback` (without it, it would repeat
# the `sharelora` row exactly).
ROWS = (
    ("lora", "lora", False),
    ("lora_fa", "lora_fa", False),
    ("sharelora", "sharelora", False),
    ("hydralora", "hydralora", False),
    ("relora", "relora", True),
    ("relora_multi", "relora_multi", False),
    ("relora_multi+reducer", "relora_multi", True),
)
ROW_NAMES = tuple(name for name, _, _ in ROWS)


def select_rows(only):
    """The `ROWS` named in a comma-separated string (all when empty)."""
    if not only:
        return ROWS
    names = [n for n in only.split(",") if n]
    unknown = sorted(set(names) - set(ROW_NAMES))
    if unknown:
        raise ValueError(
            f"Unknown variants {unknown}. Use some of {ROW_NAMES}."
        )
    return tuple(row for row in ROWS if row[0] in names)


def add_common_args(parser, tasks, sizes, full_seeds="0"):
    """The arguments every fine-tuning benchmark takes.

    `sizes` is the script's `SIZES` dict: each key of its "full" entry
    becomes an integer flag (`--train-per-task`, ...) that overrides the
    mode's default. `full_seeds` is the `--seeds` default of a full run
    (pass the same to `finish_args`).
    """
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny subset, a few steps",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds (default: "
        f"{full_seeds}; --quick: 0)",
    )
    parser.add_argument("--tasks", default=",".join(tasks))
    for name in sizes["full"]:
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument(
        "--no-append", action="store_true", help="do not append to RESULTS.md"
    )


def finish_args(args, sizes, full_seeds="0"):
    """Fills what `add_common_args`' flags left unset; parses the lists.

    Seeds default to `full_seeds` in the full run and to "0" in `--quick`.
    """
    common.fill_preset(args, sizes["full"], sizes["quick"])
    if args.seeds is None:
        args.seeds = "0" if args.quick else full_seeds
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.output_dir is None:
        args.output_dir = (
            os.path.join("outputs", "benchmarks", "quick")
            if args.quick
            else os.path.join("benchmarks", "results")
        )
    return args


def rss_mb():
    """The process's resident set size now, in MiB (Linux `/proc`)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def max_rss_mb():
    """Peak RSS of the whole process so far (`getrusage`), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Samples the process's RSS in a thread; `peak_mb` is the highest seen.

    RSS covers the whole process (framework, base model, data, earlier
    variants' garbage), not the adapter alone. Sampling every `period`
    seconds can miss a short spike; `getrusage`'s lifetime peak does not,
    but it never goes down between variants, so both are recorded.
    """

    def __init__(self, period=0.02):
        self.period = period
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.period)

    def __enter__(self):
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


@contextlib.contextmanager
def timed(store, key):
    """Adds the wall seconds of the block to `store[key]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def mean_spread(values):
    """`(mean, sample std or 0, min, max)` of a list of floats."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, min(values), max(values)


def fmt_pct(values):
    """Percent: the value, or `mean ± std` (n seeds) of several."""
    values = list(values)
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    mean, std, _, _ = mean_spread(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def summary_table(results, tasks):
    """Markdown table of runs: per task, average, sizes, time, memory.

    `results`: dicts with `row`, `accuracy` ({task: fraction}), `average`,
    `adapter_params`, `adapter_percent`, `train_seconds`, `peak_rss_mb`.
    Rows keep their first appearance order; several seeds of a row are
    shown as `mean ± std`. Returns `(table, {row: [results]})`.
    """
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    headers = (
        ["variant"]
        + list(tasks)
        + [
            "average",
            "min..max avg",
            "adapter params (% base)",
            "adapter state MiB",
            "train s",
            "peak RSS MiB",
        ]
    )
    rows = []
    for name, runs in by_row.items():
        averages = [r["average"] for r in runs]
        _, _, low, high = mean_spread(averages)
        train_s = mean_spread(r["train_seconds"] for r in runs)[0]
        rows.append(
            [name]
            + [fmt_pct([r["accuracy"][t] for r in runs]) for t in tasks]
            + [
                fmt_pct(averages),
                f"{100 * low:.1f}..{100 * high:.1f}",
                f"{runs[0]['adapter_params']:,} "
                f"({runs[0]['adapter_percent']:.2f}%)",
                f"{16 * runs[0]['adapter_params'] / 2**20:.1f}",
                f"{train_s:.0f}",
                f"{max(r['peak_rss_mb'] for r in runs):.0f}",
            ]
        )
    return common.markdown_table(headers, rows), by_row


def bar_plot(
    path,
    names,
    values,
    title,
    ylabel="average accuracy (%)",
    errors=None,
    baseline=None,
):
    """Writes a bar chart PNG (needs matplotlib); returns `path` or None."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1.0 + 1.1 * len(names), 4.0))
    ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="tab:blue")
    if baseline is not None:
        ax.axhline(
            baseline, color="gray", linestyle="--", label="base / head only"
        )
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    low = min(values + ([baseline] if baseline is not None else []))
    ax.set_ylim(max(0.0, low - 10.0), None)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def command_line():
    """The command that ran this process, as one shell line."""
    backend = os.environ.get("KERAS_BACKEND", "")
    prefix = f"KERAS_BACKEND={backend} " if backend else ""
    script = os.path.relpath(sys.argv[0], os.path.dirname(HERE))
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"{prefix}.venv/bin/python {script} {args}".strip()


def repo_path(path):
    """`path` relative to the repository root."""
    return os.path.relpath(os.path.abspath(path), os.path.dirname(HERE))


def environment_lines(env):
    """`environment()` of `benchmarks.common` as a markdown bullet list."""
    keys = ", ".join(f"{k} {v}" for k, v in env.items() if k != "cpu")
    return f"- environment: {keys}\n- CPU: {env.get('cpu', 'unknown')}"


def plot_line(plot):
    """The report's "- plot: ..., data: ..." line (empty without a plot)."""
    if not plot:
        return ""
    return f"- plot: `{repo_path(plot)}`, data: `{repo_path(plot)[:-4]}.json`\n"


def load_runs(paths, merge_results, out=None):
    """`(payload, path)` of runs' JSON files (comma-separated paths).

    With several files, the first one's payload gets the wall times summed
    and the commands and starting load averages of all runs, and
    `merge_results(payload, payloads)` joins the results themselves. The
    input files are never written: the merged payload goes to `out`, by
    default `merged_<name>` beside the first file. `path` is the file the
    payload is in (`out`, or the single input file).
    """
    inputs = paths.split(",")
    payloads = []
    for each in inputs:
        with open(each) as f:
            payloads.append(json.load(f))
    payload = payloads[0]
    if len(payloads) > 1:
        merge_results(payload, payloads)
        payload["total_seconds"] = sum(p["total_seconds"] for p in payloads)
        payload["command"] = "`; `".join(p["command"] for p in payloads)
        payload["environment"]["loadavg_start"] = [
            p["environment"]["loadavg_start"] for p in payloads
        ]
        if out is None:
            folder, name = os.path.split(inputs[0])
            out = os.path.join(folder, f"merged_{name}")
    if out is None:
        return payload, inputs[0]
    if any(os.path.abspath(out) == os.path.abspath(p) for p in inputs):
        raise ValueError(
            f"The merged runs would overwrite an input file: {out!r}. "
            "Pass another output path."
        )
    common.write_json(out, payload)
    return payload, out


def publish(payload, table, plot, report_markdown, append):
    """Emits the run's result line and, if `append`, its RESULTS.md section.

    `report_markdown(payload, table, plot)` writes the section.
    """
    common.emit_result(
        {"total_seconds": payload["total_seconds"], "table": table}
    )
    if append:
        append_section(report_markdown(payload, table, plot))
    return payload


def append_section(markdown, path=RESULTS_PATH):
    """Appends `markdown` (a `## ` section) to RESULTS.md, re-reading it.

    The file is shared with other benchmarks: it is opened in append mode
    and never rewritten.
    """
    existing = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    with open(path, "a", encoding="utf-8") as f:
        if not existing:
            f.write("# Benchmark results\n")
        if existing and not existing.endswith("\n"):
            f.write("\n")
        f.write("\n" + markdown.rstrip("\n") + "\n")
    print(f"appended a section to {path}")


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"
    )
