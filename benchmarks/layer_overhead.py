"""Forward+backward time of one adapted Dense layer, as ratios to frozen.

One training-like step per configuration: `y = layer(x)`, a scalar loss
`mean(y ** 2)`, and its gradient with respect to the layer's trainable
variables AND the input `x` (a frozen layer inside a network still
back-propagates to its input). Configurations, all on the same
`(tokens, dim) @ (dim, dim)` Dense (with bias):

* `frozen`: the Dense, no adapter (gradient w.r.t. `x` only).
* `keras_lora`: Keras's own `Dense.enable_lora(rank)`.
* `act_lora`: a benchmark-only reference, `dense(x) + (x @ A) @ B` with
  no router, to show the floor of an activation-space adapter.
* `relora_e1`, `relora_e4`: `keras_relora.ReloraDense` with 1 and 4
  experts (router on `h = x @ A`, the default).

Before commit "ReloraDense: explicit einsum letters", the adapter's
einsums used `...`; TensorFlow's einsum gradient then materialised a
`(experts, rank, d_out, tokens)` tensor and `relora_e4` ran 11.9x slower
than Keras's LoRA there (RESULTS.md keeps that measurement).

Compilation follows what `model.fit` does by default on CPU: JAX under
`jax.jit`, TensorFlow under `tf.function` (XLA with `--xla`), torch eager.
Measurements are interleaved: every round times every configuration, in
a rotated order; ratios are taken inside a round, then the median and
range over rounds are printed.

Usage:

```
KERAS_BACKEND=jax python benchmarks/layer_overhead.py
python benchmarks/layer_overhead.py --all-backends
python benchmarks/layer_overhead.py --all-backends --quick   # smoke run
```
"""

import argparse
import os
import time

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, help="default 4096 (quick: 512)")
    p.add_argument("--tokens", type=int, help="default 2048 (quick: 256)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, help="default 7 (quick: 3)")
    p.add_argument(
        "--reps", type=int, help="calls per round; default 2 (quick: 3)"
    )
    p.add_argument("--warmup", type=int, help="default 2 (quick: 1)")
    p.add_argument("--xla", action="store_true", help="TF: jit_compile")
    common.add_timing_args(
        p, "comma-separated configurations to run (default: all)"
    )
    args = p.parse_args(argv)
    return common.fill_preset(
        args,
        {"rounds": 7, "reps": 2, "warmup": 2, "dim": 4096, "tokens": 2048},
        {"rounds": 3, "reps": 3, "warmup": 1, "dim": 512, "tokens": 256},
    )


def build_configs(keras, dim, rank):
    """dict name -> a built layer (base weights frozen)."""
    import keras_relora

    def dense(seed):
        layer = keras.layers.Dense(
            dim, kernel_initializer=keras.initializers.GlorotUniform(seed)
        )
        layer.build((None, dim))
        return layer

    def frozen_dense(seed):
        layer = dense(seed)
        for variable in layer.weights:
            variable.trainable = False
        return layer

    class ActLora(keras.layers.Layer):
        """Reference: `dense(x) + (x @ A) @ B`, activation space."""

        def __init__(self, base, rank):
            super().__init__()
            self.base = base
            self.a = self.add_weight(
                name="a", shape=(dim, rank), initializer="he_uniform"
            )
            self.b = self.add_weight(
                name="b", shape=(rank, dim), initializer="zeros"
            )
            self.built = True

        def call(self, x, training=None):
            return self.base(x) + keras.ops.matmul(
                keras.ops.matmul(x, self.a), self.b
            )

    configs = {}
    configs["frozen"] = frozen_dense(0)
    lora = dense(0)
    lora.enable_lora(rank)
    configs["keras_lora"] = lora
    configs["act_lora"] = ActLora(frozen_dense(0), rank)
    for experts in (1, 4):
        shared_a = keras_relora.SharedLoraA(dim, rank)
        configs[f"relora_e{experts}"] = keras_relora.ReloraDense(
            frozen_dense(0), shared_a, experts=experts
        )
    return configs


def make_runner(keras, layer, x, xla):
    """A callable that runs one forward+backward step and blocks."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss_fn(trainable, inputs, non_trainable):
            y, _ = layer.stateless_call(
                trainable, non_trainable, inputs, training=True
            )
            return jnp.mean(jnp.square(y))

        grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        xj = jnp.asarray(x)

        def run():
            jax.block_until_ready(grad(trainable, xj, non_trainable))

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        variables = list(layer.trainable_variables)

        @tf.function(jit_compile=xla)
        def step(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = layer(inputs, training=True)
                loss = tf.reduce_mean(tf.square(y))
            return tape.gradient(loss, variables + [inputs])

        def run():
            # A tf.function call on CPU returns once its outputs exist.
            step(xt)

        return run
    if backend == "torch":
        import torch

        xt = torch.as_tensor(x).requires_grad_(True)
        params = [v.value for v in layer.trainable_variables]

        def run():
            y = layer(xt, training=True)
            loss = torch.mean(torch.square(y))
            torch.autograd.grad(loss, params + [xt])

        return run
    raise ValueError(f"Unsupported backend {backend!r}")


def main(args):
    common.pin_threads_env(args.threads)
    import keras
    import numpy as np

    common.pin_threads_runtime(args.threads)
    env = common.environment(args.threads)
    backend = env["backend"]
    print(f"environment: {env}", flush=True)
    x = np.random.default_rng(0).standard_normal(
        (args.tokens, args.dim), dtype=np.float32
    )
    layers = build_configs(keras, args.dim, args.rank)
    if args.only:
        keep = ["frozen"] + args.only.split(",")
        layers = {k: v for k, v in layers.items() if k in keep}
    runners = {}
    first_call_s = {}
    for name, layer in layers.items():
        run = make_runner(keras, layer, x, args.xla)
        start = time.perf_counter()
        for _ in range(args.warmup):
            run()
        first_call_s[name] = time.perf_counter() - start
        runners[name] = run
    samples = common.interleave(runners, args.rounds, args.reps)
    env["loadavg_end"] = round(os.getloadavg()[0], 2)

    compiled = {"jax": "jax.jit", "torch": "eager"}.get(
        backend, "tf.function" + (" + XLA" if args.xla else "")
    )
    print(
        f"\nbackend={backend} ({compiled}) dim={args.dim} "
        f"tokens={args.tokens} rank={args.rank} rounds={args.rounds} "
        f"reps={args.reps} threads={args.threads} "
        f"loadavg {env['loadavg_start']} -> {env['loadavg_end']}"
    )
    rows = []
    result = {"env": env, "args": vars(args), "configs": {}}
    for name in runners:
        t = common.time_stats(samples[name])
        r = common.ratio_stats(samples, name, "frozen")
        entry = {"time": t, "vs_frozen": r, "samples": samples[name]}
        vs_lora = "-"
        if "keras_lora" in runners:
            rl = common.ratio_stats(samples, name, "keras_lora")
            entry["vs_keras_lora"] = rl
            vs_lora = common.fmt_ratio(rl)
        result["configs"][name] = entry
        rows.append(
            [
                name,
                common.fmt_ms(t),
                common.fmt_ratio(r),
                vs_lora,
                f"{first_call_s[name]:.1f}",
            ]
        )
    print(
        common.markdown_table(
            [
                "config",
                "ms/step median [min, max]",
                "x frozen median [min, max]",
                "x keras_lora median [min, max]",
                f"warm-up s ({args.warmup} calls)",
            ],
            rows,
        )
    )
    if "relora_e4" in runners and "keras_lora" in runners:
        target = result["configs"]["relora_e4"]["vs_keras_lora"]
        met = target["median"] <= 1.15
        print(
            f"target relora_e4 <= 1.15x keras_lora: "
            f"{'MET' if met else 'NOT MET'} "
            f"(median {target['median']:.3f}, "
            f"range {target['min']:.3f}-{target['max']:.3f})"
        )
    common.emit_result(result)
    common.write_json(args.json, result)


def summarise(results):
    rows = []
    for backend, result in results.items():
        if result is None:
            rows.append([backend, "failed"] + [""] * 6)
            continue
        c = result["configs"]
        cells = [backend]
        for name in (
            "keras_lora",
            "act_lora",
            "relora_e1",
            "relora_e4",
        ):
            cells.append(
                f"{c[name]['vs_frozen']['median']:.3f}" if name in c else "-"
            )
        for name in ("relora_e1", "relora_e4"):
            ratio = c.get(name, {}).get("vs_keras_lora")
            cells.append(f"{ratio['median']:.3f}" if ratio else "-")
        rows.append(cells)
    print("\nSummary (median of per-round ratios):")
    print(
        common.markdown_table(
            [
                "backend",
                "keras_lora / frozen",
                "act_lora / frozen",
                "relora_e1 / frozen",
                "relora_e4 / frozen",
                "relora_e1 / keras_lora",
                "relora_e4 / keras_lora",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    common.run_main(__file__, parse_args(), main, summarise)
