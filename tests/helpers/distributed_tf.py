"""ReLoRA under `tf.distribute.MirroredStrategy` on 2 logical CPU devices.

Run by `test_distributed_tf.py` in a subprocess (TensorFlow fixes its
logical devices when it first initialises):

    KERAS_BACKEND=tensorflow python tests/helpers/distributed_tf.py

It trains the same adapted tiny Llama 3 (same initial weights, same data,
SGD with momentum) on one device, then built, adapted and compiled under
`strategy.scope()` with the global batch split over both replicas, with
and without a `ReducerCallback`; it prints one JSON line with what the
test checks.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import tensorflow as tf

(_cpu,) = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import distributed_common as dc  # noqa: E402

import keras_relora  # noqa: E402


def replica_values(variable):
    """The value of `variable` on each replica (a MirroredVariable)."""
    values = getattr(variable.value, "values", (variable.value,))
    return [np.array(v.numpy()) for v in values]


_STRATEGIES = []


def mirrored_strategy():
    """One `MirroredStrategy` for the whole process.

    TensorFlow's collective runtime keys its all-reduces by group and
    instance; a second strategy on the same devices starts its instance
    keys again and meets the first one's cached shapes ("Shape mismatch
    in the collective instance") as soon as its steps all-reduce a
    different set of tensors.
    """
    if not _STRATEGIES:
        _STRATEGIES.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _STRATEGIES[0]


def mirrored_train(start, reducer):
    strategy = mirrored_strategy()
    with strategy.scope():
        lm, base, adapters = dc.build(start)
    log = dc.DecisionLog(lm)
    callbacks = [log.callback()]
    reducer_cb = None
    if reducer:
        reducer_cb = keras_relora.ReducerCallback(
            probe_data=dc.probe_data(), **dc.REDUCER
        )
        callbacks.insert(0, reducer_cb)
    x, y = dc.data()
    lm.fit(
        x,
        y,
        batch_size=dc.BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    replicas = [replica_values(v) for v in adapters]
    out = {
        "replicas": strategy.num_replicas_in_sync,
        "mirrored": type(adapters[0].value).__name__,
        # Every replica holds bitwise the same adapter values.
        "replicas_identical": all(
            all(np.array_equal(r[0], other) for other in r[1:])
            for r in replicas
        ),
        "base_unchanged": all(
            np.array_equal(a, b)
            for a, b in zip(dc.numpy(base), start[: len(base)], strict=False)
        ),
        "adapters": [r[0] for r in replicas],
        "decisions": log.steps,
    }
    if reducer:
        out["importance"] = reducer_cb.importance.tolist()
    return out


def main():
    result = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}
    for reducer in (False, True):
        one = dc.one_device_reference(reducer=reducer)
        many = mirrored_train(one["start"], reducer)
        n_base = len(one["start"]) - len(one["adapters"])
        result["reducer" if reducer else "plain"] = {
            "replicas": many["replicas"],
            "mirrored": many["mirrored"],
            "replicas_identical": many["replicas_identical"],
            "base_unchanged": many["base_unchanged"],
            "adapter_moved": dc.max_diff(
                one["adapters"], one["start"][n_base:]
            ),
            "adapter_max_diff": dc.max_diff(many["adapters"], one["adapters"]),
            "decisions": many["decisions"],
            "decisions_one_device": one["decisions"],
            "importance": many.get("importance"),
            "importance_one_device": one.get("importance"),
        }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
