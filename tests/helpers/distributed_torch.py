"""ReLoRA under torch `DistributedDataParallel`: 2 CPU processes, gloo.

Run by `test_distributed_torch.py` in a subprocess:

    KERAS_BACKEND=torch python tests/helpers/distributed_torch.py

As in Keras's guide "Multi-GPU distributed training with PyTorch": one
process per replica (`torch.multiprocessing.start_processes`), a
`torch.distributed` process group (gloo, loopback), a `DataLoader` with a
`DistributedSampler`, the Keras model wrapped in `DistributedDataParallel`,
and a torch training loop. The update is the compiled Keras optimizer's
(`model.optimizer.apply`), so that a `ReducerCallback` can mask it; the
loop calls the callback's hooks.

Each process trains the same adapted tiny Llama 3 (same initial weights,
SGD with momentum) on its half of every global batch, without and with a
`ReducerCallback` whose probe batch is, on each process, its own half of
the probe batch. This process trains on one device with `fit` first (the
reference), and prints one JSON line with every process's results and
the reference.
"""

import json
import os
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "torch"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORLD = 2


def ddp_train(rank, start, reducer):
    import distributed_common as dc
    import keras
    import numpy as np
    import torch

    import keras_relora

    lm, base, adapters = dc.build(start)
    x, y = dc.data()
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(x["token_ids"]),
        torch.from_numpy(x["padding_mask"]),
        torch.from_numpy(y),
    )
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=WORLD, rank=rank, shuffle=False
    )
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=dc.BATCH // WORLD
    )
    ddp_model = torch.nn.parallel.DistributedDataParallel(lm)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    callbacks = []
    if reducer:
        # This process's share of the probe batch (rows rank, rank + 2,
        # ...: as the sampler splits the data); the callback adds the
        # probe's loss sums over the processes.
        px, py = dc.probe_data()
        mine = slice(rank, None, WORLD)
        probe = ({k: v[mine] for k, v in px.items()}, py[mine])
        callbacks.append(
            keras_relora.ReducerCallback(probe_data=probe, **dc.REDUCER)
        )
    log = dc.DecisionLog(lm)
    for callback in callbacks:
        callback.set_model(lm)
        callback.on_train_begin()
    log.start()
    for step, (token_ids, padding_mask, targets) in enumerate(loader):
        for callback in callbacks:
            callback.on_train_batch_begin(step)
        logits = ddp_model(
            {"token_ids": token_ids, "padding_mask": padding_mask},
            training=True,
        )
        loss = loss_fn(targets, logits)
        lm.zero_grad()
        loss.backward()
        trainable = lm.trainable_weights
        with torch.no_grad():
            lm.optimizer.apply([v.value.grad for v in trainable], trainable)
        for callback in callbacks:
            callback.on_train_batch_end(step)
        log.step()
    for callback in callbacks:
        callback.on_train_end()
    out = {
        "base_unchanged": all(
            np.array_equal(a, b)
            for a, b in zip(dc.numpy(base), start[: len(base)], strict=False)
        ),
        "adapters": [a.tolist() for a in dc.numpy(adapters)],
        "decisions": log.steps,
    }
    if reducer:
        out["importance"] = callbacks[0].importance.tolist()
    return out


def worker(rank, port, folder):
    import numpy as np
    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
    )
    try:
        # The one-device run's starting point.
        with np.load(os.path.join(folder, "start.npz")) as f:
            start = [f[str(i)] for i in range(len(f.files))]
        out = {"rank": rank}
        for reducer in (False, True):
            out["reducer" if reducer else "plain"] = ddp_train(
                rank, start, reducer
            )
        with open(os.path.join(folder, f"{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        torch.distributed.destroy_process_group()


def main():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import distributed_common as dc
    import numpy as np

    # One device, `fit`, in this process (outside the process group).
    reference = {}
    for reducer in (False, True):
        one = dc.one_device_reference(reducer=reducer)
        n_base = len(one["start"]) - len(one["adapters"])
        reference["reducer" if reducer else "plain"] = {
            "adapters": [a.tolist() for a in one["adapters"]],
            "decisions": one["decisions"],
            "importance": one.get("importance"),
            "adapter_moved": dc.max_diff(
                one["adapters"], one["start"][n_base:]
            ),
        }
    with tempfile.TemporaryDirectory() as folder:
        np.savez(
            os.path.join(folder, "start.npz"),
            **{str(i): v for i, v in enumerate(one["start"])},
        )
        # A worker's exception is raised here by `start_processes`.
        mp.start_processes(
            worker,
            args=(port, folder),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(WORLD):
            with open(os.path.join(folder, f"{rank}.json")) as f:
                results.append(json.load(f))
    results.sort(key=lambda r: r["rank"])
    print(
        "RESULT " + json.dumps({"processes": results, "one_device": reference})
    )


if __name__ == "__main__":
    main()
