"""ReLoRA under `tf.distribute.MirroredStrategy`, 2 logical CPU devices.

The work happens in `distributed_tf.py`, in a subprocess: TensorFlow fixes
its logical devices when it first initialises.
"""

import keras
import numpy as np
import pytest
from distributed_runner import run_script

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="tf.distribute runs on the TensorFlow backend",
)

# The replicas compute the same sums in another order (each half of the
# batch, then an all-reduce): float32 round-off, against adapters that
# move by ~1e-1.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def result():
    return run_script("distributed_tf.py", "tensorflow")


@pytest.mark.parametrize("run", ["plain", "reducer"])
def test_mirrored_training_equals_one_device(result, run):
    assert result["logical_cpus"] == 2
    r = result[run]
    assert r["replicas"] == 2
    assert r["mirrored"] == "MirroredVariable"
    assert r["adapter_moved"] > 1e-3
    assert r["adapter_max_diff"] < TOLERANCE
    assert r["replicas_identical"]
    assert r["base_unchanged"]


def test_reducer_decisions_equal_one_device(result):
    r = result["reducer"]
    # Every step updated exactly update_layers=1 block's B, the same
    # blocks as on one device.
    assert [len(d) for d in r["decisions"]] == [1, 1, 1, 1]
    assert r["decisions"] == r["decisions_one_device"]
    assert any(v != 0.0 for v in r["importance"])
    np.testing.assert_allclose(
        r["importance"], r["importance_one_device"], rtol=1e-3, atol=0
    )
    # Without the Reducer every block's B moves every step.
    assert result["plain"]["decisions"] == [[0, 1, 2, 3]] * 4
