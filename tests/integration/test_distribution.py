"""Model- and data-parallel training on 8 (fake) CPU devices, JAX only.

The work happens in `distributed_fit.py`, in a subprocess: JAX reads the
device count from `XLA_FLAGS` only when it starts.
"""

import json
import os
import subprocess
import sys

import keras
import pytest
from distributed_common import xla_flags

HELPERS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers"
)

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="keras.distribution's ModelParallel and DataParallel run on JAX",
)


@pytest.fixture(scope="module")
def result():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(device_count=8),
    )
    process = subprocess.run(
        [sys.executable, os.path.join(HELPERS, "distributed_fit.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    (line,) = [
        line
        for line in process.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    return json.loads(line[len("RESULT ") :])


def test_model_parallel_training_equals_one_device(result):
    assert result["devices"] == 8
    run = result["model_parallel"]
    assert result["adapter_moved"] > 1e-3
    assert run["adapter_max_diff"] < 1e-6
    assert run["base_unchanged"]
    assert abs(run["losses"][0] - result["losses"][0]) < 1e-5


def test_layout_map_shards_b_like_the_base_output_axis(result):
    run = result["model_parallel"]
    # keras-hub's Llama map: query kernel (hidden, heads, head_dim) is
    # ("model", "batch", None), so its output (heads, head_dim) is split
    # on "batch"; the up projection (hidden, intermediate) is
    # ("batch", "model"); the down projection (intermediate, hidden) is
    # ("model", "batch").
    assert run["base_query_spec"] == ["model", "batch", None]
    assert run["b_kernel_specs"] == {
        "q": [None, None, "batch"],
        "k": [None, None, "batch"],
        "v": [None, None, "batch"],
        "up": [None, None, "model"],
        "down": [None, None, "batch"],
    }
    # A (shared by the blocks) and the routers are replicated.
    assert set(map(tuple, run["a_specs"].values())) == {(None, None)}
    assert run["router_specs"] == ["[None, None]"]


def test_data_parallel_training_equals_one_device(result):
    assert result["data_parallel"]["adapter_max_diff"] < 1e-6


def test_reducer_runs_under_model_parallel(result):
    reducer = result["reducer"]
    assert reducer["probes"] == 1  # 3 steps, interval 2.
    assert len(reducer["importance"]) == 2
    assert any(value != 0.0 for value in reducer["importance"])
