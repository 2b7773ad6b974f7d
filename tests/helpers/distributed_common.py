"""What the several-device scripts share: a tiny adapted Llama, its data,
and a record of the Reducer's decisions.

Imported by `distributed_tf.py`, `distributed_torch.py` and
`distributed_jax_processes.py` after each has chosen its backend; it
imports keras only inside functions.
"""

import os

import numpy as np

CONFIG = {
    "vocabulary_size": 64,
    "num_layers": 4,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 16,
    "intermediate_dim": 32,
}
STEPS = 4
BATCH = 8  # The global batch: every replica gets BATCH // replicas rows.
SEQ = 8
REDUCER = {"update_layers": 1, "suppress_layers": 2, "interval": 2, "seed": 7}


def xla_flags(device_count=None):
    """`XLA_FLAGS` for a subprocess: this process's flags (the test run's
    compiler settings) without a host device count (XLA reads it once, at
    start-up), and `device_count` CPU devices if given."""
    flags = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    if device_count:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    return " ".join(flags)


def data():
    """`(x, y)`: STEPS global batches of BATCH rows, in order."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (STEPS * BATCH, SEQ + 1)).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((STEPS * BATCH, SEQ), "int32"),
    }
    return x, tokens[:, 1:]


def probe_data():
    """One fixed probe batch (the same on every replica and process)."""
    x, y = data()
    return {k: v[:BATCH] for k, v in x.items()}, y[:BATCH]


def build(start=None):
    """An adapted, compiled tiny Llama; `start` sets every variable.

    Returns:
        `(model, base, adapters)`: the model, its base variables and its
        adapter variables (in a fixed order).
    """
    import keras
    import keras_hub

    import keras_relora

    keras.utils.set_random_seed(0)
    lm = keras_hub.models.Llama3CausalLM(
        keras_hub.models.Llama3Backbone(**CONFIG), preprocessor=None
    )
    base = list(lm.weights)
    lm.enable_relora(rank=4, experts=2)
    adapters = list(keras_relora.get_state(lm).variables().values())
    if start is not None:
        for variable, value in zip(base + adapters, start, strict=False):
            variable.assign(value)
    lm.compile(
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm, base, adapters


def numpy(variables):
    import keras

    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=False))


def b_kernels(model):
    """`[(block, B kernel)]` of every adapter, in a fixed order."""
    import keras_relora

    state = keras_relora.get_state(model)
    return [
        (adapter.block, adapter.b_kernel)
        for _, adapter in sorted(state.adapters.items())
    ]


class DecisionLog:
    """Records, after every step, which blocks' B kernels changed.

    Call `start()` before training and `step()` after every step (or use
    `callback()` with `fit`).
    """

    def __init__(self, model):
        self.model = model
        self.steps = []

    def _values(self):
        return [(block, numpy([b])[0]) for block, b in b_kernels(self.model)]

    def start(self):
        self._last = self._values()

    def step(self):
        now = self._values()
        changed = sorted(
            {
                int(block)
                for (block, old), (_, new) in zip(self._last, now, strict=False)
                if not np.array_equal(old, new)
            }
        )
        self.steps.append(changed)
        self._last = now

    def callback(self):
        import keras

        log = self

        class Log(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                log.start()

            def on_train_batch_end(self, batch, logs=None):
                _ = self.model  # On JAX, syncs the state before reading it.
                log.step()

        return Log()


def one_device_reference(reducer=False, reducer_args=None):
    """Trains with `fit` on one device; returns what the scripts compare.

    Returns:
        dict with `start` (every variable before training), `adapters`
        (after), `decisions` and `importance` (with `reducer=True`).
    """
    import keras_relora

    lm, base, adapters = build()
    start = numpy(base) + numpy(adapters)
    lm, base, adapters = build(start)
    log = DecisionLog(lm)
    callbacks = [log.callback()]
    reducer_cb = None
    if reducer:
        reducer_cb = keras_relora.ReducerCallback(
            probe_data=probe_data(), **(reducer_args or REDUCER)
        )
        callbacks.insert(0, reducer_cb)
    x, y = data()
    lm.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    out = {"start": start, "adapters": numpy(adapters), "decisions": log.steps}
    if reducer:
        out["importance"] = reducer_cb.importance.tolist()
    return out
