"""ReLoRA under torch `DistributedDataParallel`, 2 CPU processes (gloo).

The work happens in `distributed_torch.py`, in a subprocess that starts
the two processes (Keras's guide "Multi-GPU distributed training with
PyTorch", on CPU and loopback).
"""

import keras
import numpy as np
import pytest
from distributed_runner import run_script

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="DistributedDataParallel runs on the torch backend",
)

# DDP averages the two halves' gradients: float32 round-off against
# adapters that move by ~1e-1.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def result():
    return run_script("distributed_torch.py", "torch")


def adapters(run):
    return [np.array(a) for a in run["adapters"]]


@pytest.mark.parametrize("run", ["plain", "reducer"])
def test_ddp_training_equals_one_device(result, run):
    one = result["one_device"][run]
    assert one["adapter_moved"] > 1e-3
    first, second = result["processes"]
    for process in (first, second):
        assert process[run]["base_unchanged"]
        got = adapters(process[run])
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(got, adapters(one), strict=False)
        )
        assert diff < TOLERANCE
    # DDP keeps the replicas bitwise equal.
    for a, b in zip(adapters(first[run]), adapters(second[run]), strict=False):
        np.testing.assert_array_equal(a, b)


def test_reducer_decisions_agree_across_processes(result):
    # Each process probes a different half of the probe batch; the
    # callback adds the loss sums over the processes, so both take the
    # decisions one device takes on the whole batch.
    first, second = (p["reducer"] for p in result["processes"])
    one = result["one_device"]["reducer"]
    assert [len(d) for d in first["decisions"]] == [1, 1, 1, 1]
    assert first["decisions"] == second["decisions"] == one["decisions"]
    assert first["importance"] == second["importance"]
    assert any(v != 0.0 for v in first["importance"])
    np.testing.assert_allclose(
        first["importance"], one["importance"], rtol=1e-3, atol=0
    )
