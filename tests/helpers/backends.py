"""Which backend runs a test that costs minutes.

The library is tested on every backend by the tiny-model tests. A test
that loads real weights or runs an example or a benchmark script in a
subprocess checks what does not depend on the backend that runs it (a
conversion, a pipeline, an example's output) at the cost of minutes per
run: it runs on one backend, and these tests are spread over the three so
that each backend's run takes about as long. `only_on` says which.
"""

import keras
import pytest

BACKEND = keras.config.backend()
BACKENDS = ("torch", "jax", "tensorflow")


def only_on(backend, what="this test"):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    return pytest.mark.skipif(
        BACKEND != backend,
        reason=f"{what} takes minutes; it runs on {backend} only (the "
        "library is tested on every backend by the tiny-model tests)",
    )
