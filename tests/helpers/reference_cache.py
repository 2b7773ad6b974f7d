"""Reference outputs computed once per machine, shared by every backend.

The real-model tests compare Keras with `transformers` reading the same
GGUF (PyTorch on CPU, whatever the Keras backend). With the backends'
suites side by side, each would load the same transformers model to
compute the same logits: minutes each. `cached` computes them once, under
a file lock, and keeps them as an `.npz` file in the offline models' cache
(`$KERAS_RELORA_CACHE`), named by a hash of everything they depend on (the
inputs, and the versions of transformers and of the model's package).
"""

import fcntl
import hashlib
import importlib.metadata
import json
import os

import numpy as np

from relora_offline.smollm2 import default_cache_dir


def cached(name, inputs, packages, compute):
    """`compute()` (a dict of arrays), or what an earlier call stored.

    Args:
        name: str. The file's prefix.
        inputs: JSON-serializable. What `compute` reads (texts, ids).
        packages: list of str. Distributions whose version the result
            depends on (transformers, the model's package).
        compute: callable returning a dict of numpy arrays.
    """
    key = json.dumps(
        {
            "inputs": inputs,
            "versions": {p: importlib.metadata.version(p) for p in packages},
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = os.path.join(default_cache_dir(), "test-references")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{digest}.npz")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # One process computes.
        if not os.path.exists(path):
            result = compute()
            partial = path + ".partial.npz"
            np.savez(partial, **result)
            os.replace(partial, path)
    with np.load(path) as stored:
        return {k: stored[k] for k in stored.files}
