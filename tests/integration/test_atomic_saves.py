"""A process killed (SIGKILL) while it saves leaves a loadable file.

A child process saves an adapted model again and again, alternating two
sets of adapter values, and is killed at a random moment (after its first
complete save). The file (or PEFT folder) must then load and give the
outputs of one of the two complete saves: never a mix, never a broken
file. One kill per format, at a random moment, on the backend under test.
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tiny_models as tm

import keras_relora

pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
HELPERS = os.path.join(ROOT, "tests", "helpers")

CHILD = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np
    import keras_relora

    kind, path, refs = sys.argv[1], sys.argv[2], sys.argv[3]
    keras.utils.set_random_seed(0)
    if kind == "peft":
        import tiny_models as tm

        model = tm.llama3_causal_lm()
        model.enable_relora(rank=2, experts=1, share_a="layer",
                            targets=["q", "v"])
        x = tm.token_batch()
    else:
        inputs = keras.Input((6,))
        h = keras.layers.Dense(12, activation="relu", name="hidden")(inputs)
        outputs = keras.layers.Dense(3, name="head")(h)
        model = keras.Model(inputs, outputs)
        model.enable_relora(rank=2, experts=2)
        x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    variables = list(keras_relora.get_state(model).variables().values())
    versions = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        values = [rng.normal(0, 0.3, v.shape).astype("float32")
                  for v in variables]
        for v, value in zip(variables, values):
            v.assign(value)
        versions.append((values, keras.ops.convert_to_numpy(model(x))))
    np.savez(refs, out0=versions[0][1], out1=versions[1][1])
    save = {
        "keras": lambda: model.save(path),
        "weights": lambda: model.save_weights(path),
        "adapters": lambda: model.save_relora_weights(path),
        "peft": lambda: keras_relora.save_peft(model, path),
    }[kind]
    i = 0
    while True:
        for v, value in zip(variables, versions[i % 2][0]):
            v.assign(value)
        save()
        if i == 0:
            print("SAVED", flush=True)
        i += 1
    """
)

NAMES = {
    "keras": "m.keras",
    "weights": "m.weights.h5",
    "adapters": "m.safetensors",
    "peft": "adapter",
}


def _functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(12, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs)


def _outputs_of_loaded(kind, path):
    if kind == "keras":
        model = keras.models.load_model(path)
    elif kind == "weights":
        model = _functional()
        model.enable_relora(rank=2, experts=2)
        model.load_weights(path)
    elif kind == "adapters":
        model = _functional()
        model.load_relora_weights(path)
    else:
        keras.utils.set_random_seed(0)
        model = tm.llama3_causal_lm()
        keras_relora.load_peft(model, path)
        return keras.ops.convert_to_numpy(model(tm.token_batch()))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    return keras.ops.convert_to_numpy(model(x))


def _kill_while_saving(tmp_path, kind, delay):
    path = str(tmp_path / NAMES[kind])
    refs = str(tmp_path / "refs.npz")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HELPERS]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, path, refs],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "SAVED", "the child did not save"
        time.sleep(delay)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    return path, np.load(refs)


@pytest.mark.parametrize("kind", ["keras", "weights", "adapters", "peft"])
def test_killed_save_leaves_a_complete_file(tmp_path, kind):
    delay = random.Random(kind).uniform(0, 0.4)
    path, refs = _kill_while_saving(tmp_path, kind, delay)
    out = _outputs_of_loaded(kind, path)
    matches = [
        np.allclose(out, refs[name], atol=1e-5) for name in ("out0", "out1")
    ]
    assert any(matches), f"killed after {delay:.3f} s: the file is a mix"
