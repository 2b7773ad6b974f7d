"""ReLoRA with `keras.distribution.DataParallel` over 2 JAX processes.

The work happens in `distributed_jax_processes.py`, in a subprocess that
starts two processes joined by `keras.distribution.initialize`
(`jax.distributed.initialize`, gloo CPU collectives, loopback).
"""

import keras
import numpy as np
import pytest
from distributed_runner import run_script

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="jax.distributed runs on the JAX backend",
)

# Each process computes half of the batch's gradient sums, then an
# all-reduce: float32 round-off against adapters that move by ~1e-1.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def result():
    return run_script("distributed_jax_processes.py", "jax")


def adapters(run):
    return [np.array(a) for a in run["adapters"]]


@pytest.mark.parametrize("run", ["plain", "reducer"])
def test_two_process_training_equals_one_device(result, run):
    one = result["one_device"][run]
    assert one["adapter_moved"] > 1e-3
    for process in result["processes"]:
        assert process["returncode"] == 0
        assert process["processes"] == 2
        assert process["devices"] == 2
        assert process["local_devices"] == 1
        assert process[run]["base_unchanged"]
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(adapters(process[run]), adapters(one), strict=False)
        )
        assert diff < TOLERANCE
    first, second = result["processes"]
    for a, b in zip(adapters(first[run]), adapters(second[run]), strict=False):
        np.testing.assert_array_equal(a, b)


def test_reducer_decisions_agree_across_processes(result):
    first, second = (p["reducer"] for p in result["processes"])
    one = result["one_device"]["reducer"]
    assert [len(d) for d in first["decisions"]] == [1, 1, 1, 1]
    assert first["decisions"] == second["decisions"] == one["decisions"]
    assert first["importance"] == second["importance"]
    assert any(v != 0.0 for v in first["importance"])
    np.testing.assert_allclose(
        first["importance"], one["importance"], rtol=1e-3, atol=0
    )
