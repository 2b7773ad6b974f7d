"""Shared helpers of the benchmarks: threads, interleaved timing, tables.

Import this module BEFORE keras: `pin_threads_env` must run before a
backend framework is imported for its thread settings to take effect.
Nothing here imports keras or a backend at module level.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

BACKENDS = ("torch", "jax", "tensorflow")
RESULT_TAG = "RESULT_JSON "


def pin_threads_env(threads):
    """Sets the thread-count environment of every backend (before import).

    torch and TensorFlow honour `OMP_NUM_THREADS` and their own settings
    (see `pin_threads_runtime`). XLA:CPU (JAX) has no flag for N threads;
    with `threads=1` its Eigen pool is switched off, otherwise it uses
    every core it sees (2 on the benchmark machine).
    """
    value = str(threads)
    for name in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
    ):
        os.environ[name] = value
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        extra = (
            "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
    cache = os.path.expanduser("~/.cache/keras_relora_bench_jax")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)


def pin_threads_runtime(threads):
    """Pins the imported backend's thread pools (after `import keras`)."""
    import keras

    backend = keras.config.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # Already set: only allowed before any parallel work.
    elif backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TF already initialised; the env variables still hold.


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state():
    """The checkout's commit and whether keras_relora/ had local edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "keras_relora"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return {}
    edited = sorted(line[3:] for line in dirty if line.strip())
    return {"commit": commit, "keras_relora_local_edits": edited}


def environment(threads):
    """Versions, CPU and threads, as a dict (call after `import keras`)."""
    import keras

    backend = keras.config.backend()
    env = {
        "backend": backend,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    env.update(_git_state())
    try:
        import keras_hub

        env["keras_hub"] = keras_hub.__version__
    except ImportError:
        pass
    module = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
    env[backend] = __import__(module[backend]).__version__
    if backend == "tensorflow":
        import tensorflow as tf

        env["tf_intra_op"] = (
            tf.config.threading.get_intra_op_parallelism_threads()
        )
    elif backend == "torch":
        import torch

        env["torch_threads"] = torch.get_num_threads()
    return env


def interleave(runners, rounds, reps):
    """Times each runner `reps` times per round, rotating the order.

    Args:
        runners: dict name -> callable that runs one step and blocks until
            its results are ready.
        rounds: int. Each round times every runner once (after the
            others), so a slow spell of the machine hits all of them.
        reps: int. Calls per runner per round; the round's sample is
            their mean.

    Returns:
        dict name -> list of seconds per call, one entry per round.
    """
    names = list(runners)
    samples = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if r % 2:
            order = order[::-1]
        for name in order:
            start = time.perf_counter()
            for _ in range(reps):
                runners[name]()
            samples[name].append((time.perf_counter() - start) / reps)
    return samples


def ratio_stats(samples, name, baseline):
    """Median, min and max of per-round `name / baseline` time ratios."""
    ratios = [
        a / b for a, b in zip(samples[name], samples[baseline], strict=False)
    ]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


def time_stats(values):
    """Median, min and max of a list of seconds, in milliseconds."""
    return {
        "median_ms": 1e3 * statistics.median(values),
        "min_ms": 1e3 * min(values),
        "max_ms": 1e3 * max(values),
    }


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, or `None` (with a
    message) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    return plt


def markdown_table(headers, rows):
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(stats):
    return f"{stats['median']:.3f} [{stats['min']:.3f}, {stats['max']:.3f}]"


def fmt_ms(stats):
    return (
        f"{stats['median_ms']:.1f} "
        f"[{stats['min_ms']:.1f}, {stats['max_ms']:.1f}]"
    )


def emit_result(result):
    """Prints the machine-readable result line the driver collects."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def status_kib(field):
    """A field of `/proc/self/status` in KiB, e.g. `VmRSS`, `VmHWM`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak():
    """Resets `VmHWM`, the peak resident set, to the current one (Linux;
    raises `OSError` where `/proc/self/clear_refs` cannot be written)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write_json(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {path}")


def add_timing_args(p, only_help):
    """The flags both timing benchmarks take (threads, modes, backends)."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small sizes, few rounds",
    )
    p.add_argument("--only", default=None, help=only_help)
    p.add_argument(
        "--all-backends",
        action="store_true",
        help="run once per backend in subprocesses, then summarise",
    )
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument(
        "--json", default=None, help="also write every result to this file"
    )


def fill_preset(args, full, quick):
    """Sets each flag of `full` (or `quick` with --quick) left at None."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def child_argv(argv):
    """`argv` without the driver's own flags (`--all-backends`, `--json`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--all-backends":
            pass
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


def run_backends(script, argv, backends):
    """Runs `script argv` once per backend, one after the other.

    Each backend gets its own process (`KERAS_BACKEND=...`); they never
    run at the same time, so they do not compete for the cores. Returns
    the parsed result of each process (None where it failed).
    """
    results = {}
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        result = None
        with subprocess.Popen(
            [sys.executable, script, *argv],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            for line in proc.stdout:
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG) :])
                else:
                    print(line, end="", flush=True)
        if proc.returncode != 0:
            print(f"[{backend}] exited with code {proc.returncode}")
        results[backend] = result
    return results


def run_main(script, args, main, summarise):
    """A benchmark's entry point: this process's backend, or every backend.

    With `args.all_backends`, runs `script` once per backend in a
    subprocess (`run_backends`), then `summarise(results)` and writes the
    JSON; otherwise `main(args)` here.
    """
    if not args.all_backends:
        main(args)
        return
    results = run_backends(
        os.path.abspath(script),
        child_argv(sys.argv[1:]),
        args.backends.split(","),
    )
    summarise(results)
    write_json(args.json, results)
