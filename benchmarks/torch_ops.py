"""Where a torch train step's eager work goes: aten ops per adapter.

Counts the aten operators that one `train_on_batch` of a tiny Llama 3
(2 blocks, width 64, AdamW, eager torch) dispatches, per configuration,
with `torch.profiler`, and reports `(ops - ops without adapters) /
adapters`: the eager work each adapter adds (forward, backward and its
optimizer update). The counts do not depend on the machine's load.

`--einsum` makes `ReloraDense` use its einsum path on torch too (the
path JAX and TensorFlow use), to compare with the matmul path.

`--jit NAME` instead runs two `fit` calls of configuration NAME compiled
with `jit_compile=True` (Keras wraps the train step in `torch.compile`)
and prints their wall times; run it with
`TORCH_LOGS=recompiles,graph_breaks` to see which frames recompile and
why.

Usage:

```
KERAS_BACKEND=torch python benchmarks/torch_ops.py
KERAS_BACKEND=torch python benchmarks/torch_ops.py --einsum
TORCH_LOGS=recompiles,graph_breaks KERAS_BACKEND=torch \\
    python benchmarks/torch_ops.py --jit frozen_embed
```
"""

import argparse
import collections
import os
import sys
import time

import common

CONFIG = {
    "vocabulary_size": 256,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 64,
    "intermediate_dim": 128,
}
NAMES = (
    "frozen_embed",
    "keras_lora",
    "lora",
    "relora_multi",
    "relora_multi+reducer",
)


def build(name, jit_compile="auto"):
    import keras
    import step_time

    import keras_relora

    model = step_time.build_model(CONFIG)
    variant = name.split("+")[0]
    if variant == "frozen_embed":
        step_time.setup_frozen_embed(model, 8)
    elif variant == "keras_lora":
        step_time.setup_keras_lora(model, 8)
    else:
        step_time.setup_variant(variant)(model, 8)
    callbacks = []
    if name.endswith("+reducer"):
        callbacks = step_time.reducer_callbacks(model, interval=2)
    model.compile(
        optimizer=keras.optimizers.AdamW(2e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=jit_compile,
    )
    if callbacks:
        callbacks[0].set_model(model)  # Installs the masked update.
    del keras_relora
    return model, callbacks


def data(batch):
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, (batch, 17)).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((batch, 16), "int32"),
    }
    return x, tokens[:, 1:]


def count_ops(name, einsum):
    import torch

    import keras_relora

    model, _ = build(name)
    state = keras_relora.get_state(model)
    if einsum and state is not None:
        for adapter in state.adapters.values():
            adapter._matmul = False
    x, y = data(2)
    for _ in range(2):
        model.train_on_batch(x, y)
    with torch.profiler.profile() as prof:
        model.train_on_batch(x, y)
    return collections.Counter(
        {
            e.key: e.count
            for e in prof.key_averages()
            if e.key.startswith("aten::")
        }
    )


def jit_check(name):
    model, callbacks = build(name, jit_compile=True)
    x, y = data(8)
    for i in range(2):
        start = time.perf_counter()
        history = model.fit(
            x,
            y,
            batch_size=2,
            epochs=1,
            verbose=0,
            shuffle=False,  # Random tokens, no tasks: only times the fit.
            callbacks=callbacks,
        )
        print(
            f"{name}, jit_compile=True: fit {i + 1} (4 steps) "
            f"{time.perf_counter() - start:.1f} s, loss "
            f"{history.history['loss']}",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--einsum", action="store_true")
    p.add_argument("--jit", default=None, choices=NAMES)
    args = p.parse_args()
    os.environ["KERAS_BACKEND"] = "torch"
    common.pin_threads_env(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras  # noqa: F401

    common.pin_threads_runtime(1)
    if args.jit:
        jit_check(args.jit)
        return
    counts = {name: count_ops(name, args.einsum) for name in NAMES}
    adapters = CONFIG["num_layers"] * 5  # q, k, v, up, down per block
    base = sum(counts["frozen_embed"].values())
    path = "einsum" if args.einsum else "matmul (torch default)"
    print(f"ReloraDense path: {path}; {adapters} adapters")
    print(
        common.markdown_table(
            ["config", "aten ops per train_on_batch", "extra ops per adapter"],
            [
                [
                    name,
                    sum(c.values()),
                    f"{(sum(c.values()) - base) / adapters:.1f}",
                ]
                for name, c in counts.items()
            ],
        )
    )
    extra = counts["relora_multi"] - counts["frozen_embed"]
    print(
        "relora_multi - frozen_embed, most frequent ops:", extra.most_common(12)
    )


if __name__ == "__main__":
    main()
