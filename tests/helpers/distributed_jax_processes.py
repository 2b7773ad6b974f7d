"""ReLoRA with `keras.distribution.DataParallel` over 2 JAX processes.

Run by `test_distributed_jax_processes.py` in a subprocess:

    KERAS_BACKEND=jax python tests/helpers/distributed_jax_processes.py

The shape of a multi-host run on one machine: this script starts 2 worker
processes (`--worker N`), each with one CPU device, joined by
`keras.distribution.initialize` (`jax.distributed.initialize`, gloo CPU
collectives, loopback); `DataParallel` spans both processes' devices.
Every process passes the same dataset of global batches; `DataParallel`
gives each process its half of every batch and assembles the global batch
from the processes' parts. This process trains the same
adapted tiny Llama 3 (same initial weights, SGD with momentum) on one
device with `fit`, without and with a `ReducerCallback`, and prints one
JSON line with every worker's results and the reference.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
# Probes at steps 2 and 4: the epoch's last step too. The workers' data
# is a distributed dataset of unknown length, so `fit` runs one more,
# empty step at the end of the epoch (the case
# `_keras_internals.rebuild_jax_train_state` exists for).
REDUCER_ARGS = {
    "update_layers": 1,
    "suppress_layers": 2,
    "interval": 2,
    "seed": 7,
}
sys.path.insert(0, HERE)
WORLD = 2


def worker(pid, port, start_file):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import distributed_common as dc
    import keras
    import numpy as np

    import keras_relora

    keras.config.disable_traceback_filtering()
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=WORLD,
        process_id=pid,
    )
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    with np.load(start_file) as f:
        start = [f[str(i)] for i in range(len(f.files))]
    import tensorflow as tf

    # Every process passes the whole dataset, batched to the GLOBAL batch
    # size (a static one: `drop_remainder=True`); `DataParallel` shards it
    # (`auto_shard_dataset`): process `pid` gets rows
    # [pid * local, (pid + 1) * local) of every global batch.
    x, y = dc.data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        dc.BATCH, drop_remainder=True
    )
    local = dc.BATCH // WORLD
    px, py = dc.probe_data()
    mine = slice(pid * local, (pid + 1) * local)
    probe = ({k: v[mine] for k, v in px.items()}, py[mine])
    out = {
        "pid": pid,
        "processes": jax.process_count(),
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
    }
    for reducer in (False, True):
        lm, base, adapters = dc.build(start)
        log = dc.DecisionLog(lm)
        callbacks = [log.callback()]
        if reducer:
            reducer_cb = keras_relora.ReducerCallback(
                probe_data=probe, **REDUCER_ARGS
            )
            callbacks.insert(0, reducer_cb)
        lm.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)
        run = {
            "base_unchanged": all(
                np.array_equal(a, b)
                for a, b in zip(
                    dc.numpy(base), start[: len(base)], strict=False
                )
            ),
            "adapters": [a.tolist() for a in dc.numpy(adapters)],
            "decisions": log.steps,
        }
        if reducer:
            run["importance"] = reducer_cb.importance.tolist()
        out["reducer" if reducer else "plain"] = run
    # A file, not stdout: the JAX runtime's own messages at exit may
    # interleave with a long line.
    path = os.path.join(os.path.dirname(start_file), f"{pid}.json")
    with open(path, "w") as f:
        json.dump(out, f)


def main():
    import distributed_common as dc
    import numpy as np

    reference = {}
    for reducer in (False, True):
        one = dc.one_device_reference(
            reducer=reducer, reducer_args=REDUCER_ARGS
        )
        n_base = len(one["start"]) - len(one["adapters"])
        reference["reducer" if reducer else "plain"] = {
            "adapters": [a.tolist() for a in one["adapters"]],
            "decisions": one["decisions"],
            "importance": one.get("importance"),
            "adapter_moved": dc.max_diff(
                one["adapters"], one["start"][n_base:]
            ),
        }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        start_file = os.path.join(tmp, "start.npz")
        np.savez(start_file, **{str(i): v for i, v in enumerate(one["start"])})
        # One CPU device per process.
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=dc.xla_flags())
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(pid),
                    str(port),
                    start_file,
                ],
                env=env,
            )
            for pid in range(WORLD)
        ]
        for w in workers:
            w.wait(timeout=600)
        results = []
        for pid, w in enumerate(workers):
            path = os.path.join(tmp, f"{pid}.json")
            run = {}
            if os.path.exists(path):
                with open(path) as f:
                    run = json.load(f)
            run["returncode"] = w.returncode
            results.append(run)
    print(
        "RESULT " + json.dumps({"processes": results, "one_device": reference})
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
