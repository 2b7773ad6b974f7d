"""ReLoRA training under `keras.distribution` on 8 CPU devices (JAX).

Run by `test_distribution.py` in a subprocess, because JAX reads
`XLA_FLAGS=--xla_force_host_platform_device_count=8` only at start-up:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python tests/helpers/distributed_fit.py

It trains the same adapted tiny Llama 3 (same initial weights, same data,
SGD) on one device, under `ModelParallel` with keras-hub's layout map and
`enable_relora(..., layout_map=...)`, and under `DataParallel`, then under
`ModelParallel` with a `ReducerCallback`; it prints one JSON line with
what the test checks (differences to the one-device run, shardings).
"""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_relora  # noqa: E402

CONFIG = dict(
    vocabulary_size=64,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
)
STEPS = 3
BATCH = 8


def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (STEPS * BATCH, 9)).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((STEPS * BATCH, 8), "int32"),
    }
    return x, tokens[:, 1:]


def build(start=None, layout_map=None):
    """An adapted, compiled tiny Llama; `start` sets every variable."""
    keras.utils.set_random_seed(0)
    lm = keras_hub.models.Llama3CausalLM(
        keras_hub.models.Llama3Backbone(**CONFIG), preprocessor=None
    )
    base = list(lm.weights)
    lm.enable_relora(rank=4, experts=2, layout_map=layout_map)
    adapters = list(keras_relora.get_state(lm).variables().values())
    if start is not None:
        for variable, value in zip(base + adapters, start, strict=False):
            variable.assign(value)
    lm.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm, base, adapters


def numpy(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=False))


def train(start, layout_map=None, callbacks=None):
    lm, base, adapters = build(start, layout_map)
    x, y = data()
    history = lm.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return lm, base, adapters, history.history["loss"]


def spec(variable):
    return [
        None if axis is None else str(axis)
        for axis in variable.value.sharding.spec
    ]


def main():
    devices = keras.distribution.list_devices()
    result = {"devices": len(devices)}

    # One device: the reference.
    lm, base, adapters = build()
    start = numpy(base) + numpy(adapters)
    del lm
    _, base, adapters, loss = train(start)
    reference = numpy(adapters)
    result["losses"] = loss
    # How far training moved the adapters: the scale of the diffs below.
    result["adapter_moved"] = max_diff(reference, start[len(base) :])

    mesh = keras.distribution.DeviceMesh(
        (2, 4), axis_names=("batch", "model"), devices=devices
    )
    layout_map = keras_hub.models.Llama3Backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    lm, base, adapters, loss = train(start, layout_map)
    state = keras_relora.get_state(lm)
    result["model_parallel"] = {
        "adapter_max_diff": max_diff(numpy(adapters), reference),
        "base_unchanged": all(
            np.array_equal(a, b)
            for a, b in zip(numpy(base), start[: len(base)], strict=False)
        ),
        "b_kernel_specs": {
            adapter.role: spec(adapter.b_kernel)
            for adapter in state.adapters.values()
        },
        "a_specs": {name: spec(a.kernel) for name, a in state.shared_a.items()},
        "router_specs": sorted(
            {str(spec(a.router_kernel)) for a in state.adapters.values()}
        ),
        "base_query_spec": spec(
            lm.backbone.get_layer(
                "transformer_layer_0"
            )._self_attention_layer._query_dense.kernel
        ),
        "losses": loss,
    }

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    _, _, adapters, loss = train(start)
    result["data_parallel"] = {
        "adapter_max_diff": max_diff(numpy(adapters), reference),
        "losses": loss,
    }

    layout_map = keras_hub.models.Llama3Backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=2, seed=0)
    _, _, _, loss = train(start, layout_map, callbacks=[reducer])
    result["reducer"] = {
        "probes": len(reducer.importance_history[0]) - 1,
        "importance": reducer.importance.tolist(),
        "losses": loss,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
