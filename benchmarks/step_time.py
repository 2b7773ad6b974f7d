"""Steady `fit` step time of a small Llama 3, per adapter method.

One `keras_hub.models.Llama3CausalLM` (random weights, no download) per
configuration, all built from the same config and trained with
`model.fit` on the same random token batches:

* `frozen_norm`: no adapters; every weight frozen except the final
  `sequence_output_layernorm` scale (so `fit` has something to train).
  The backward pass stops at the last norm: about the cost of a forward.
* `frozen_embed`: no adapters; only the input embedding table trains, so
  the backward pass crosses every block (the floor of any adapter run).
* `keras_lora`: Keras's own `layer.enable_lora(rank)` on exactly the
  layers that `enable_relora`'s default targets select (q, k, v, up,
  down of every block), every other weight frozen.
* one column per entry of `keras_relora.VARIANTS`, via
  `model.enable_relora(rank=rank, **VARIANTS[name])`.
* `relora_multi+reducer` (`--reducer`): `relora_multi` with
  `keras_relora.ReducerCallback(update_layers=L // 4)` (see
  `reducer_callbacks`, the hook). Reported: its steady step (steps with
  no probe) against `relora_multi` in the same rounds, the measured
  probing steps, and the probe cost amortised over `interval` steps.

Compiled as `Model.compile` does by default (`jit_compile="auto"`: JAX
jit, TensorFlow `tf.function` without XLA on CPU, torch eager) unless
`--jit-compile` says otherwise. Optimizer AdamW(2e-4), sparse categorical
cross-entropy from logits, no metrics.

Timing: a callback stamps the end of every batch (this syncs each step,
as any per-batch callback does); a step's time is the gap between two
consecutive batch ends, so the first step of each `fit` call (iterator
start-up) is dropped. Every round runs one short `fit` per configuration
in a rotated order; per-round ratios to `keras_lora` are summarised by
their median and range.

Usage:

```
KERAS_BACKEND=jax python benchmarks/step_time.py
python benchmarks/step_time.py --all-backends
python benchmarks/step_time.py --all-backends --quick   # smoke run
```
"""

import argparse
import itertools
import math
import os
import statistics
import time

import common

CONFIG = {
    "vocabulary_size": 2048,
    "num_layers": 8,
    "num_query_heads": 8,
    "num_key_value_heads": 2,
    "hidden_dim": 512,
    "intermediate_dim": 1536,
}
QUICK_CONFIG = {
    "vocabulary_size": 256,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 64,
    "intermediate_dim": 128,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, help="default 4 (quick: 2)")
    p.add_argument("--seq", type=int, help="default 128 (quick: 16)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, help="default 5 (quick: 2)")
    p.add_argument(
        "--steps",
        type=int,
        help="steps per fit call, >= 2; default 4 (quick: 3)",
    )
    p.add_argument(
        "--jit-compile",
        default="auto",
        choices=("auto", "true", "false"),
        help="passed to compile (default: Keras's 'auto')",
    )
    p.add_argument(
        "--reducer",
        action="store_true",
        help="add relora_multi+reducer (needs keras_relora.ReducerCallback)",
    )
    p.add_argument(
        "--reducer-interval",
        type=int,
        default=10,
        help="ReducerCallback(interval=...): steps between probes; the "
        "step counter runs across fit calls",
    )
    common.add_timing_args(
        p, "comma-separated configurations (keras_lora always runs)"
    )
    args = p.parse_args(argv)
    args.config = dict(QUICK_CONFIG if args.quick else CONFIG)
    common.fill_preset(
        args,
        {"batch": 4, "seq": 128, "rounds": 5, "steps": 4},
        {"batch": 2, "seq": 16, "rounds": 2, "steps": 3},
    )
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step of a fit is dropped)")
    return args


def build_model(config, seed=0):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Llama3Backbone(**config)
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def freeze_all(model):
    for variable in model.weights:
        variable.trainable = False


def target_layers(model):
    """The layers `enable_relora` adapts by default (q, k, v, up, down)."""
    from keras_relora.adapt import targets

    return list(targets.select(model.backbone, None))


def setup_frozen_norm(model, rank):
    freeze_all(model)
    norm = model.backbone.get_layer("sequence_output_layernorm")
    for variable in norm.weights:
        variable.trainable = True
    return "final norm scale trainable"


def setup_frozen_embed(model, rank):
    freeze_all(model)
    model.backbone.token_embedding.embeddings.trainable = True
    return "input embedding table trainable"


def setup_keras_lora(model, rank):
    freeze_all(model)
    chosen = target_layers(model)
    for _, layer, _ in chosen:
        layer.enable_lora(rank)
    roles = sorted({role for _, _, role in chosen})
    return f"enable_lora({rank}) on {len(chosen)} layers ({','.join(roles)})"


def setup_variant(name):
    def setup(model, rank):
        from keras_relora import VARIANTS

        model.enable_relora(rank=rank, **VARIANTS[name])
        return f"VARIANTS[{name!r}] = {VARIANTS[name]}"

    return setup


def reducer_callbacks(model, interval=10):
    """The hook for the Reducer column: callbacks to pass to `fit`.

    `update_layers` is a quarter of the model's blocks (L/4), as the issue
    asks; the probe runs every `interval` steps (the callback's default is
    10) on its default probe batch (the first batch of the fit data).
    """
    import keras_relora

    blocks = keras_relora.get_state(model).num_blocks
    return [
        keras_relora.ReducerCallback(
            update_layers=max(1, blocks // 4), interval=interval, seed=0
        )
    ]


def config_setups(args):
    from keras_relora import VARIANTS

    setups = {
        "frozen_norm": setup_frozen_norm,
        "frozen_embed": setup_frozen_embed,
        "keras_lora": setup_keras_lora,
    }
    for name in VARIANTS:
        setups[name] = setup_variant(name)
    if args.only:
        keep = {"keras_lora", *args.only.split(",")}
        setups = {k: v for k, v in setups.items() if k in keep}
    return setups


def make_data(args, steps):
    import numpy as np

    rng = np.random.default_rng(0)
    n = steps * args.batch
    vocab = args.config["vocabulary_size"]
    tokens = rng.integers(1, vocab, (n, args.seq + 1)).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((n, args.seq), "int32"),
    }
    return x, tokens[:, 1:]


class Entry:
    """One model under measurement."""

    def __init__(self, name, model, note, steps, callbacks=None):
        self.name = name
        self.model = model
        self.note = note
        self.steps = steps
        self.callbacks = callbacks or []
        self.rounds = []  # per round: list of per-step seconds
        self.probe_steps = []  # seconds of measured steps that probed


def _probes_done(callbacks):
    """Probes recorded so far by a ReducerCallback among `callbacks`."""
    for callback in callbacks:
        history = getattr(callback, "importance_history", None)
        if history is not None:
            return len(history[0])
    return 0


def make_timer(others):
    """Stamps every batch end; runs after `others` (e.g. the Reducer), so
    a step's time includes what they do at its end (the probe)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []
            self.probes = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.probes.append(_probes_done(others))

    return StepTimer()


def run_fit(entry, data, steps):
    """One `fit` of `steps` steps; returns (normal, probing) step times."""
    timer = make_timer(entry.callbacks)
    x, y = data[steps]
    entry.model.fit(
        x,
        y,
        batch_size=entry.args_batch,
        epochs=1,
        shuffle=False,  # Random tokens, no tasks: the order only times steps.
        verbose=0,
        callbacks=[*entry.callbacks, timer],
    )
    normal, probing = [], []
    pairs = itertools.pairwise(zip(timer.ends, timer.probes, strict=False))
    for (t0, p0), (t1, p1) in pairs:
        (probing if p1 > p0 else normal).append(t1 - t0)
    return normal, probing


def main(args):
    common.pin_threads_env(args.threads)
    import keras

    import keras_relora  # noqa: F401  (adds Model.enable_relora)

    common.pin_threads_runtime(args.threads)
    env = common.environment(args.threads)
    print(f"environment: {env}", flush=True)
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]

    entries = []
    for name, setup in config_setups(args).items():
        start = time.perf_counter()
        model = build_model(args.config)
        note = setup(model, args.rank)
        entries.append(Entry(name, model, note, args.steps))
        print(f"built {name}: {note} ({time.perf_counter() - start:.1f} s)")
    if args.reducer:
        model = build_model(args.config)
        setup_variant("relora_multi")(model, args.rank)
        callbacks = reducer_callbacks(model, args.reducer_interval)
        entries.append(
            Entry(
                "relora_multi+reducer",
                model,
                f"relora_multi + ReducerCallback(update_layers="
                f"{callbacks[0].update_layers}, interval="
                f"{callbacks[0].interval})",
                args.steps,
                callbacks,
            )
        )
    data = {}
    for entry in entries:
        entry.args_batch = args.batch
        if entry.steps not in data:
            data[entry.steps] = make_data(args, entry.steps)
        entry.model.compile(
            optimizer=keras.optimizers.AdamW(2e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
            jit_compile=jit,
        )
        entry.trainable = sum(
            math.prod(v.shape) for v in entry.model.trainable_weights
        )
        # Warm-up fit (traces/compiles the train step), not measured. With
        # the Reducer it runs `interval` steps, so that the first probe
        # (which traces the test step) falls in the warm-up.
        start = time.perf_counter()
        warm = args.reducer_interval if entry.callbacks else entry.steps
        if warm not in data:
            data[warm] = make_data(args, warm)
        run_fit(entry, data, warm)
        entry.warmup_s = time.perf_counter() - start
        print(f"warmed up {entry.name} ({entry.warmup_s:.1f} s)", flush=True)
    print(f"total params: {entries[0].model.count_params():,}", flush=True)

    for r in range(args.rounds):
        shift = r % len(entries)
        order = entries[shift:] + entries[:shift]
        if r % 2:
            order = order[::-1]
        for entry in order:
            normal, probing = run_fit(entry, data, entry.steps)
            entry.rounds.append(normal)
            entry.probe_steps += probing
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    env["loadavg_end"] = round(os.getloadavg()[0], 2)
    report(args, env, entries)


def report(args, env, entries):
    by_name = {e.name: e for e in entries}
    base = by_name["keras_lora"]
    base_medians = [statistics.median(s) for s in base.rounds]
    result = {"env": env, "args": vars(args), "configs": {}}
    rows = []
    for entry in entries:
        medians = [statistics.median(s) for s in entry.rounds]
        ratios = [a / b for a, b in zip(medians, base_medians, strict=False)]
        flat = [t for s in entry.rounds for t in s]
        t = common.time_stats(flat)
        r = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
        result["configs"][entry.name] = {
            "note": entry.note,
            "trainable": entry.trainable,
            "time": t,
            "mean_ms": 1e3 * statistics.mean(flat),
            "vs_keras_lora": r,
            "rounds": entry.rounds,
            "warmup_s": entry.warmup_s,
        }
        rows.append(
            [
                entry.name,
                f"{entry.trainable:,}",
                common.fmt_ms(t),
                common.fmt_ratio(r),
                f"{entry.warmup_s:.1f}",
            ]
        )
    compiled = {"jax": "jax.jit", "torch": "eager"}.get(env["backend"])
    if compiled is None:
        compiled = "tf.function" + (
            " + XLA" if args.jit_compile == "true" else " (no XLA)"
        )
    print(
        f"\nbackend={env['backend']} ({compiled}) config={args.config} "
        f"batch={args.batch} seq={args.seq} rank={args.rank} "
        f"rounds={args.rounds} steps/fit={args.steps} threads={args.threads}"
        f" loadavg {env['loadavg_start']} -> {env['loadavg_end']}"
    )
    print(
        common.markdown_table(
            [
                "config",
                "trainable params",
                "ms/step median [min, max]",
                "x keras_lora median [min, max]",
                "warm-up s",
            ],
            rows,
        )
    )
    if "relora_multi" in by_name:
        r = result["configs"]["relora_multi"]["vs_keras_lora"]
        met = r["median"] <= 1.15
        print(
            "target relora_multi <= 1.15x keras_lora: "
            f"{'MET' if met else 'NOT MET'} (median {r['median']:.3f}, "
            f"range {r['min']:.3f}-{r['max']:.3f})"
        )
    if "relora_multi+reducer" in by_name:
        report_reducer(args, result, by_name)
    common.emit_result(result)
    common.write_json(args.json, result)


def report_reducer(args, result, by_name):
    """Steady step time with vs without the Reducer, and the probe cost.

    Steady: the per-round median of the non-probing steps, as a ratio to
    `relora_multi` (no callback) in the same round. Probe cost: median
    probing step minus the steady step. Amortised: the steady ratio times
    `1 + probe cost / (interval * steady step)`.
    """
    plain = by_name["relora_multi"]
    reducer = by_name["relora_multi+reducer"]
    ratios = [
        statistics.median(a) / statistics.median(b)
        for a, b in zip(reducer.rounds, plain.rounds, strict=False)
    ]
    steady_ms = 1e3 * statistics.median([t for s in reducer.rounds for t in s])
    plain_ms = 1e3 * statistics.median([t for s in plain.rounds for t in s])
    info = {
        "steady_vs_relora_multi": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
        "steady_ms": steady_ms,
        "relora_multi_ms": plain_ms,
        "probe_steps_ms": [1e3 * t for t in reducer.probe_steps],
        "interval": args.reducer_interval,
    }
    line = (
        "reducer: steady step / relora_multi "
        f"{common.fmt_ratio(info['steady_vs_relora_multi'])}; "
    )
    if reducer.probe_steps:
        probe_ms = statistics.median(info["probe_steps_ms"]) - steady_ms
        extra = probe_ms / (args.reducer_interval * steady_ms)
        amortised = info["steady_vs_relora_multi"]["median"] * (1 + extra)
        info["probe_cost_ms"] = probe_ms
        info["probe_extra_per_step"] = extra
        info["amortised_vs_relora_multi"] = amortised
        line += (
            f"{len(reducer.probe_steps)} probing steps measured, probe "
            f"cost {probe_ms:.0f} ms (median probing step - steady step) "
            f"= {probe_ms / steady_ms:.2f} steady steps, i.e. "
            f"+{100 * extra:.1f}% per step amortised over interval="
            f"{args.reducer_interval}; amortised / relora_multi = steady "
            f"ratio x (1 + that) = {amortised:.3f}"
        )
    else:
        line += "no probe fell in a measured step (raise --rounds)"
    result["reducer"] = info
    print(line)


def summarise(results):
    names = []
    for result in results.values():
        for name in (result or {}).get("configs", {}):
            if name not in names:
                names.append(name)
    rows = []
    for name in names:
        cells = [name]
        for result in results.values():
            c = (result or {}).get("configs", {}).get(name)
            cells.append(f"{c['vs_keras_lora']['median']:.3f}" if c else "-")
        rows.append(cells)
    print("\nSummary: step time / keras_lora (median of per-round ratios)")
    print(common.markdown_table(["config", *results], rows))


if __name__ == "__main__":
    common.run_main(__file__, parse_args(), main, summarise)
