"""Shared test setup.

Layout: `unit/` (the library on tiny synthetic models, seconds per test),
`integration/` (keras-hub exports, saving formats, distributed runs, real
offline models), `benchmarks/` (the benchmark pipelines and their quick
runs), `examples/` (the examples and the README). Helpers live in
`helpers/`, which this file puts on `sys.path`: `import tiny_models as tm`.
Every test outside `unit/` is marked `slow`: `pytest -m "not slow"` runs
the unit tests alone.
"""

import gc
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

TESTS = pathlib.Path(__file__).resolve().parent

# JAX compiles every function of every test model, and the models are
# tiny: compiling takes most of a JAX test's time, running it almost none.
# Set before Keras imports JAX, and inherited by the scripts the tests run
# in subprocesses:
# - XLA's LLVM back end without optimization (compiles about twice as
#   fast; the same HLO, so the same numbers up to float round-off);
# - JAX's persistent cache keeps every compilation, not only those over
#   1 s: the same tiny model and shapes recur across tests and processes.
_XLA_FLAG = "--xla_backend_optimization_level=0"
if _XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + _XLA_FLAG
    ).strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(TESTS.parent / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, str(TESTS / "helpers"))

import keras  # noqa: E402
import pytest  # noqa: E402

if keras.config.backend() == "torch":
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SLOW_FOLDERS = ("integration", "benchmarks", "examples")


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0]
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _no_explicit_gc_collect():
    # Keras runs a full `gc.collect()` each time a layer deletes a variable
    # (`Layer.__delattr__`): `quantize` deletes every float kernel, 43 in a
    # tiny Gemma 3, and late in a run each collection scans millions of
    # objects (~1 s). Explicit collections do nothing in the tests and
    # their fixtures; the interpreter's automatic collections still free
    # the memory.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gc, "collect", lambda generation=2: 0)
        yield


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


def pytest_collection_finish(session):
    # Every test module is imported now (TensorFlow, torch, JAX, keras-hub,
    # transformers...): keep their millions of objects out of the garbage
    # collector's automatic scans.
    gc.collect()
    gc.freeze()
