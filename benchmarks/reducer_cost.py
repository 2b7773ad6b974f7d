"""What the Reducer costs and saves on SmolLM2-135M: memory and step time.

One run per backend (`KERAS_BACKEND=...`); each row trains in its own child
process, one after another, so that each has its own peak memory:

* `plain`: `relora_multi` (rank 8, 4 experts), AdamW, no Reducer;
* `reducer`: the same with `ReducerCallback(interval=10)` (K = L/4);
* `reducer_snapshot`: the Reducer with its update of B forced onto the
  fallback that other optimizers get (a copy of B and its slots kept
  during the step: what the Reducer did before it computed Adam itself);
* `b_frozen`: no Reducer, every B kernel frozen before `compile`: no dB
  and no update of B at any step. `plain` minus this row bounds what
  skipping the unselected blocks' dB could save (a K = L/4 Reducer skips
  3/4 of it).

* `timing`: `plain` and `reducer` models in ONE process, their fits
  alternating in rounds, so that a shared machine's load falls on both
  alike: the step-time ratio to trust (the rows above run one after
  another, under whatever load each met).

Memory: the resident set (VmRSS) after the model is loaded, adapted and
has run one forward pass (`base`), then the peak (VmHWM, reset just before
`fit` through `/proc/self/clear_refs`) during a `fit` of `--steps` steps;
the row's growth is `peak - base`. The first step traces and compiles the
step (XLA's compiler on JAX) and the peak after it (VmHWM reset again at
the end of step 1) is what the later steps need: both are given. Rows
named more than once are compared with the median of the `plain` rows.

Time (rows above): a callback stamps the end of every batch; a step is the
gap between
two batch ends (the first step, with tracing, is dropped). Steady = median
of the steps without a probe; a probe step's extra = its time minus the
steady step; amortised = steady + median probe extra / interval.

Usage (SmolLM2 through `relora_offline`; hold the heavy lock):

```
flock /tmp/heavy.lock env KERAS_BACKEND=jax python benchmarks/reducer_cost.py
```
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common

ROWS = ("plain", "reducer", "reducer_snapshot", "b_frozen", "timing")
BATCH, SEQ, RANK, INTERVAL = 4, 128, 8, 10


def _adapted_lm(row, steps, threads):
    """SmolLM2 with `relora_multi`, compiled, and `steps` random batches."""
    common.pin_threads_env(threads)
    import keras
    import keras_hub
    import numpy as np

    common.pin_threads_runtime(threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    import keras_relora
    from relora_offline.smollm2 import load_smollm2

    keras.utils.set_random_seed(0)
    loaded = load_smollm2(sequence_length=SEQ)
    lm = keras_hub.models.Llama3CausalLM(loaded.backbone, preprocessor=None)
    lm.enable_relora(rank=RANK, **keras_relora.VARIANTS["relora_multi"])
    state = keras_relora.get_state(lm)
    if row == "b_frozen":
        for adapter in state.adapters.values():
            adapter.b_kernel.trainable = False
    lm.compile(
        optimizer=keras.optimizers.AdamW(2e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    rows = BATCH * steps
    vocab = lm.backbone.vocabulary_size
    x = {
        "token_ids": rng.integers(1, vocab, (rows, SEQ)).astype("int32"),
        "padding_mask": np.ones((rows, SEQ), "int32"),
    }
    y = np.roll(x["token_ids"], -1, axis=1)
    return lm, x, y


def xla_memory(threads):
    """JAX: the buffers XLA plans for one compiled train step, `plain`
    against `reducer` (its masked update of B inside the step).

    Each model runs one step of `fit` (the Reducer installs its update
    there), then its `train_step` is compiled as Keras's JAX trainer
    compiles it (`jax.jit`, the state donated) and XLA's
    `memory_analysis()` gives the temporary buffers and the arguments.
    Not a resident-set measurement: what the step itself allocates.
    """
    import jax
    import keras

    import keras_relora

    if keras.config.backend() != "jax":
        raise SystemExit("--xla-memory needs KERAS_BACKEND=jax")
    out = {}
    for row in ("plain", "reducer"):
        lm, x, y = _adapted_lm(row, 1, threads)
        callbacks = []
        if row == "reducer":
            callbacks.append(keras_relora.ReducerCallback(interval=100, seed=0))
        lm.fit(x, y, batch_size=BATCH, verbose=0, callbacks=callbacks)
        state = tuple(
            [v.value for v in variables]
            for variables in (
                lm.trainable_variables,
                lm.non_trainable_variables,
                lm.optimizer.variables,
                lm.metrics_variables,
            )
        )
        step = jax.jit(lm.train_step, donate_argnums=0)
        analysis = step.lower(state, (x, y)).compile().memory_analysis()
        out[row] = {
            "temp_mib": analysis.temp_size_in_bytes / 2**20,
            "argument_mib": analysis.argument_size_in_bytes / 2**20,
            "output_mib": analysis.output_size_in_bytes / 2**20,
            "alias_mib": analysis.alias_size_in_bytes / 2**20,
        }
        keras_relora.unload(lm)
    print(
        common.markdown_table(
            ["row", *out["plain"]],
            [
                [row, *(f"{v:,.1f}" for v in d.values())]
                for row, d in out.items()
            ],
        )
    )
    common.emit_result(out)


def child(row, steps, threads):
    import keras

    import keras_relora

    lm, x, y = _adapted_lm(row, steps, threads)
    lm.predict_on_batch({k: v[:BATCH] for k, v in x.items()})
    callbacks = []
    reducer = None
    if row.startswith("reducer"):
        reducer = keras_relora.ReducerCallback(interval=INTERVAL, seed=0)
        reducer.set_model(lm)
        if row == "reducer_snapshot":
            reducer._masked.rule = None  # The fallback: copy and restore.
        callbacks.append(reducer)
    ends = []
    first_step_peak = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())
            if batch == 0:  # Tracing and compiling end with the first step.
                first_step_peak.append(common.status_kib("VmHWM"))
                common.reset_peak()

    callbacks.append(Stamp())
    base = common.status_kib("VmRSS")
    common.reset_peak()
    lm.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
    later_peak = common.status_kib("VmHWM")
    peak = max(first_step_peak[0], later_peak)
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    # Gap i ends at step i + 2; probes run after steps INTERVAL, 2*INTERVAL.
    probe_steps = (
        set(range(INTERVAL, steps + 1, INTERVAL)) if reducer else set()
    )
    steady = [g for i, g in enumerate(gaps) if i + 2 not in probe_steps]
    probing = [g for i, g in enumerate(gaps) if i + 2 in probe_steps]
    out = {
        "row": row,
        "base_mib": base / 1024,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - base) / 1024,
        "first_step_growth_mib": (first_step_peak[0] - base) / 1024,
        "later_growth_mib": (later_peak - base) / 1024,
        "steady_ms": 1e3 * statistics.median(steady),
        "steady_all_ms": [round(1e3 * g, 1) for g in gaps],
        "probe_step_ms": [1e3 * g for g in probing],
    }
    if reducer is not None:
        out["summary"] = reducer.summary(print_fn=lambda _: None)
    print(common.RESULT_TAG + json.dumps(out))


def _uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout


def timing_child(steps, rounds, threads):
    """`plain` and `reducer` models in one process, fits alternating.

    Each round fits both models `steps // rounds` steps, in alternating
    order, so that both see the same load; the Reducer's probes fall on
    its steps `INTERVAL, 2 * INTERVAL, ...` (counted over the rounds).
    """
    common.pin_threads_env(threads)
    import keras
    import keras_hub
    import numpy as np

    common.pin_threads_runtime(threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    import keras_relora
    from relora_offline.smollm2 import load_smollm2

    per_round = steps // rounds
    models = {}
    for name in ("plain", "reducer"):
        keras.utils.set_random_seed(0)
        loaded = load_smollm2(sequence_length=SEQ)
        lm = keras_hub.models.Llama3CausalLM(loaded.backbone, preprocessor=None)
        lm.enable_relora(rank=RANK, **keras_relora.VARIANTS["relora_multi"])
        lm.compile(
            optimizer=keras.optimizers.AdamW(2e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        models[name] = lm
    rng = np.random.default_rng(0)
    rows = BATCH * per_round
    vocab = models["plain"].backbone.vocabulary_size
    x = {
        "token_ids": rng.integers(1, vocab, (rows, SEQ)).astype("int32"),
        "padding_mask": np.ones((rows, SEQ), "int32"),
    }
    y = np.roll(x["token_ids"], -1, axis=1)
    reducer = keras_relora.ReducerCallback(interval=INTERVAL, seed=0)
    times = {"plain": [], "reducer": []}  # (global step, seconds)

    def fit(name):
        lm = models[name]
        ends = []

        class Stamp(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                ends.append(time.perf_counter())

        start = int(keras.ops.convert_to_numpy(lm.optimizer.iterations))
        callbacks = [reducer, Stamp()] if name == "reducer" else [Stamp()]
        lm.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
        for i, (a, b) in enumerate(zip(ends, ends[1:], strict=False)):
            times[name].append((start + i + 2, b - a))

    fit("plain")  # Traces and warms both; not timed.
    fit("reducer")
    for name in times:
        times[name] = []
    for r in range(rounds):
        for name in ("plain", "reducer") if r % 2 else ("reducer", "plain"):
            fit(name)
    out = {"row": "timing", "rounds": rounds, "per_round": per_round}
    for name, values in times.items():
        probes = (
            {s for s, _ in values if s % INTERVAL == 0}
            if name == "reducer"
            else set()
        )
        out[name] = {
            "steady_ms": 1e3
            * statistics.median([t for s, t in values if s not in probes]),
            "probe_step_ms": [1e3 * t for s, t in values if s in probes],
            "steps": len(values),
        }
    out["summary"] = reducer.summary(print_fn=lambda _: None)
    print(common.RESULT_TAG + json.dumps(out))


def main(args):
    common.pin_threads_env(args.threads)
    env = common.environment(args.threads)
    env["uptime_start"] = _uptime().strip()
    results = []
    for row in args.rows.split(","):
        command = [
            sys.executable,
            __file__,
            "--child",
            row,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--timing-rounds",
            str(args.timing_rounds),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [
            line
            for line in done.stdout.splitlines()
            if line.startswith(common.RESULT_TAG)
        ]
        if done.returncode or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {row} failed ({done.returncode})")
        result = json.loads(lines[-1][len(common.RESULT_TAG) :])
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "summary"}))
    env["uptime_end"] = _uptime().strip()
    report(args, env, results)


def _amortised(steady, probes):
    extra = statistics.median(probes) - steady if probes else 0.0
    return steady + extra / INTERVAL


def report(args, env, results):
    by_row = {r["row"]: r for r in results}
    plain_rows = [r for r in results if r["row"] == "plain"]
    # Repeated rows are compared with the median of the `plain` rows.
    plain = (
        {
            key: statistics.median(r[key] for r in plain_rows)
            for key in ("growth_mib", "later_growth_mib")
        }
        if plain_rows
        else None
    )
    rows = []
    for r in results:
        if r["row"] == "timing":
            continue
        probe = r["probe_step_ms"]
        amortised = _amortised(r["steady_ms"], probe)
        later = r["later_growth_mib"]
        rows.append(
            [
                r["row"],
                f"{r['base_mib']:.0f}",
                f"{r['growth_mib']:.0f}",
                f"{r['growth_mib'] - plain['growth_mib']:+.0f}"
                if plain
                else "",
                f"{later:.0f}",
                f"{later - plain['later_growth_mib']:+.0f}" if plain else "",
                f"{r['steady_ms']:.0f}",
                ", ".join(f"{p:.0f}" for p in probe),
                f"{amortised:.0f}",
            ]
        )
    print()
    print(
        f"backend {env.get('backend')}, {args.steps} steps of {BATCH} x "
        f"{SEQ} tokens, threads {args.threads}, keras {env.get('keras')}, "
        f"commit {env.get('commit')}"
    )
    print(f"uptime at start: {env['uptime_start']}")
    print(f"uptime at end:   {env['uptime_end']}")
    print("\nOne child process per row (memory; times one after another):\n")
    print(
        common.markdown_table(
            [
                "row",
                "base RSS (MiB)",
                "peak growth in fit (MiB)",
                "vs plain (MiB)",
                "peak growth after step 1 (MiB)",
                "vs plain (MiB)",
                "steady step (ms)",
                "probe steps (ms)",
                "amortised (ms)",
            ],
            rows,
        )
    )
    timing = by_row.get("timing")
    if timing:
        p, r = timing["plain"], timing["reducer"]
        amortised = _amortised(r["steady_ms"], r["probe_step_ms"])
        print(
            f"\nOne process, both models, fits alternating "
            f"({timing['rounds']} rounds of {timing['per_round']} steps):\n"
        )
        print(
            common.markdown_table(
                [
                    "plain steady (ms)",
                    "Reducer steady (ms)",
                    "Reducer / plain",
                    "probe steps (ms)",
                    "Reducer amortised (ms)",
                    "amortised / plain",
                ],
                [
                    [
                        f"{p['steady_ms']:.0f}",
                        f"{r['steady_ms']:.0f}",
                        f"{r['steady_ms'] / p['steady_ms']:.3f}",
                        ", ".join(f"{t:.0f}" for t in r["probe_step_ms"]),
                        f"{amortised:.0f}",
                        f"{amortised / p['steady_ms']:.3f}",
                    ]
                ],
            )
        )
    for r in results:
        if "summary" in r:
            print(f"\n{r['row']}:\n{r['summary']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--timing-rounds", type=int, default=4)
    p.add_argument(
        "--xla-memory",
        action="store_true",
        help="JAX: XLA's planned buffers of the compiled train step, "
        "plain vs reducer (no training run)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.xla_memory:
        xla_memory(parsed.threads)
    elif parsed.child == "timing":
        timing_child(parsed.steps, parsed.timing_rounds, parsed.threads)
    elif parsed.child:
        child(parsed.child, parsed.steps, parsed.threads)
    else:
        main(parsed)
