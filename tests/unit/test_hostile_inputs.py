"""Inputs a hostile user would try: nothing silently wrong.

Each test refuses with a clear error and leaves the model untouched, or
gives the exact result. Tiny models; runs on the three backends.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora
from keras_relora.saving import adapter_file

FAST = {"run_eagerly": keras.config.backend() == "tensorflow"}


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def functional(x, **kwargs):
    model = tm.functional_model()
    model(x)
    if kwargs:
        model.enable_relora(**kwargs)
    return model


def compile_mse(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", **FAST)


# `fit` after the trainable set changed, without recompiling.


@pytest.mark.parametrize("change", ["enable", "load", "prune", "unload"])
def test_fit_after_trainable_set_changed_refuses_and_model_stays_usable(
    tmp_path, change
):
    x, y = tm.dense_data()
    path = str(tmp_path / "adapters.safetensors")
    if change == "load":
        donor = functional(x, rank=2, experts=2)
        tm.randomize_adapters(donor)
        donor.save_relora_weights(path)
    model = (
        functional(x, rank=2, experts=2)
        if change in ("prune", "unload")
        else functional(x)
    )
    compile_mse(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    if change == "enable":
        model.enable_relora(rank=2, experts=2)
    elif change == "load":
        model.load_relora_weights(path, check_base=False)
    elif change == "prune":
        keras_relora.prune(model, 0.5, strategy="random", seed=0)
    else:
        keras_relora.unload(model)
    before = tm.snapshot(model)
    with pytest.raises(ValueError, match=r"compile\(\)"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    tm.assert_unchanged(model, before)
    # Still usable: predict, save, and compile + fit.
    y_pred = model.predict(x, verbose=0)
    assert np.all(np.isfinite(y_pred))
    model.save(tmp_path / "after.keras")
    compile_mse(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.all(np.isfinite(to_numpy(model(x))))


# A keras-hub Task resumes exactly from a `.keras` file.


def _task_fit(lm, x, y, steps, callback):
    lm.fit(
        x,
        y,
        batch_size=4,
        epochs=steps,
        verbose=0,
        shuffle=False,
        callbacks=[callback],
    )


def test_task_resumes_exactly_from_a_keras_file(tmp_path):
    x, y, _ = tm.lm_data(batch=4, seq=6)

    def adapted():
        keras.utils.set_random_seed(0)
        lm = tm.llama3_causal_lm(num_layers=4)
        lm.enable_relora(rank=2, experts=2, targets=["q", "v"])
        lm.compile(
            optimizer=keras.optimizers.Adam(5e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **FAST,
        )
        return lm

    def reducer():
        return keras_relora.ReducerCallback(
            update_layers=1, interval=2, trials=2, seed=3
        )

    straight = adapted()
    _task_fit(straight, x, y, 4, reducer())

    first = adapted()
    _task_fit(first, x, y, 2, reducer())
    path = tmp_path / "task.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    resumed.run_eagerly = first.run_eagerly
    assert int(to_numpy(resumed.optimizer.iterations)) == 2
    assert isinstance(resumed.optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(
        float(to_numpy(resumed.optimizer.learning_rate)), 5e-2, rtol=1e-6
    )
    _task_fit(resumed, x, y, 2, reducer())
    assert int(to_numpy(resumed.optimizer.iterations)) == 4
    # The same variables in the same order (names differ by a suffix).
    a = keras_relora.get_state(straight).variables()
    b = keras_relora.get_state(resumed).variables()
    assert len(a) == len(b)
    for (key, va), vb in zip(a.items(), b.values(), strict=False):
        np.testing.assert_allclose(
            to_numpy(vb), to_numpy(va), rtol=1e-6, atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(
        to_numpy(resumed.optimizer.variables[-1]),
        to_numpy(straight.optimizer.variables[-1]),
        rtol=1e-6,
        atol=1e-7,
    )


# The digest covers the settings; int8 bases are fingerprinted.


def _rewrite_metadata(path, edit):
    import safetensors.numpy

    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header["__metadata__"]
    edit(metadata)
    tensors = safetensors.numpy.load(data)
    with open(path, "wb") as f:
        f.write(safetensors.numpy.save(tensors, metadata=metadata))


@pytest.mark.parametrize("key, value", [("alpha", 9.0), ("top_k", 1)])
def test_changed_settings_in_the_header_are_refused(tmp_path, key, value):
    x, _ = tm.dense_data()
    model = functional(x, rank=2, experts=2, alpha=8.0, top_k=2)
    tm.randomize_adapters(model)
    path = str(tmp_path / "adapters.safetensors")
    model.save_relora_weights(path)

    def edit(metadata):
        relora = json.loads(metadata["relora"])
        relora["settings"][key] = value
        metadata["relora"] = json.dumps(relora)

    _rewrite_metadata(path, edit)
    target = functional(x)
    before = tm.snapshot(target)
    with pytest.raises(ValueError, match="SHA-256"):
        target.load_relora_weights(path)
    tm.assert_unchanged(target, before)
    assert keras_relora.get_state(target) is None


def test_changed_base_description_is_refused(tmp_path):
    x, _ = tm.dense_data()
    model = functional(x, rank=2, experts=1)
    path = str(tmp_path / "adapters.safetensors")
    model.save_relora_weights(path)

    def edit(metadata):
        base = json.loads(metadata["base"])
        base["fingerprint"] = {k: None for k in base["fingerprint"]}
        metadata["base"] = json.dumps(base)

    _rewrite_metadata(path, edit)
    with pytest.raises(ValueError, match="SHA-256"):
        functional(x).load_relora_weights(path)


def test_int8_base_refuses_adapters_of_another_int8_base(tmp_path):
    x, _ = tm.dense_data()
    keras.utils.set_random_seed(1)
    first = functional(x)
    first.quantize("int8")
    first.enable_relora(rank=2, experts=1)
    path = str(tmp_path / "adapters.safetensors")
    first.save_relora_weights(path)
    keras.utils.set_random_seed(2)
    other = functional(x)
    other.quantize("int8")
    before = tm.snapshot(other)
    with pytest.raises(ValueError, match="another base model"):
        other.load_relora_weights(path)
    tm.assert_unchanged(other, before)
    # The same int8 base takes them.
    keras.utils.set_random_seed(1)
    same = functional(x)
    same.quantize("int8")
    same.load_relora_weights(path)
    assert keras_relora.get_state(same) is not None


def test_truncated_file_is_refused_clearly(tmp_path):
    x, _ = tm.dense_data()
    path = str(tmp_path / "adapters.safetensors")
    functional(x, rank=2, experts=2).save_relora_weights(path)
    with open(path, "rb") as f:
        data = f.read()
    for cut in (4, 8 + 10, len(data) - 3):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupted"):
            adapter_file.read(path)


# Keras's own weight files and clone_model.


def test_weights_h5_into_fewer_targets_refuses(tmp_path):
    x, _ = tm.dense_data()
    source = functional(x, rank=2, experts=2)
    tm.randomize_adapters(source)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    target = functional(x, rank=2, experts=2, targets=["hidden"])
    before = tm.snapshot(target)
    with pytest.raises(ValueError, match="targets"):
        target.load_weights(path)
    tm.assert_unchanged(target, before)


def test_weights_h5_into_other_experts_refuses_before_loading(tmp_path):
    x, _ = tm.dense_data()
    source = functional(x, rank=2, experts=2)
    tm.randomize_adapters(source)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    keras.utils.set_random_seed(5)
    target = functional(x, rank=2, experts=3)
    before = tm.snapshot(target)
    with pytest.raises(ValueError, match="experts"):
        target.load_weights(path)
    tm.assert_unchanged(target, before)


def test_weights_h5_of_a_plain_model_into_an_adapted_one_refuses(tmp_path):
    x, _ = tm.dense_data()
    path = str(tmp_path / "plain.weights.h5")
    functional(x).save_weights(path)
    target = functional(x, rank=2, experts=2)
    before = tm.snapshot(target)
    with pytest.raises(ValueError, match="no ReLoRA adapters"):
        target.load_weights(path)
    tm.assert_unchanged(target, before)


def test_weights_h5_round_trip_is_exact(tmp_path):
    x, _ = tm.dense_data()
    source = functional(x, rank=2, experts=2)
    tm.randomize_adapters(source)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    target = functional(x, rank=2, experts=2)
    target.load_weights(path)
    np.testing.assert_array_equal(to_numpy(target(x)), to_numpy(source(x)))


def test_clone_model_of_a_functional_model_refuses():
    x, _ = tm.dense_data()
    model = functional(x, rank=2, experts=2)
    before = tm.snapshot(model)
    with pytest.raises(ValueError, match="clone_model"):
        keras.models.clone_model(model)
    tm.assert_unchanged(model, before)


def test_clone_model_of_a_subclassed_model_keeps_adapters():
    x, _ = tm.dense_data()
    model = tm.subclassed_model()
    model(x)
    model.enable_relora(rank=2, experts=1, share_a="layer")
    clone = keras.models.clone_model(model)
    state = keras_relora.get_state(clone)
    assert state is not None
    original = keras_relora.get_state(model)
    drop = {"targets"}  # Absolute paths: the clone has its own name.
    assert {k: v for k, v in state.settings.items() if k not in drop} == {
        k: v for k, v in original.settings.items() if k not in drop
    }
    assert len(state.adapters) == len(original.adapters) == 4
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(model(x)))


# Argument checks.


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "8"}, "alpha"),
        ({"dropout": "0.1"}, "dropout"),
        ({"dropout": float("nan")}, "dropout"),
        ({"balance_loss": float("nan")}, "balance_loss"),
        ({"balance_loss": float("inf")}, "balance_loss"),
        ({"balance_loss": "0"}, "balance_loss"),
        ({"targets": 42}, "targets"),
        ({"targets": ["hidden", 3]}, "targets"),
        ({"rank": True}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"experts": np.float32(2)}, "experts"),
        ({"top_k": True}, "top_k"),
    ],
)
def test_enable_relora_refuses_bad_arguments(kwargs, name):
    x, _ = tm.dense_data()
    model = functional(x)
    before = tm.snapshot(model)
    with pytest.raises(
        (ValueError, TypeError), match=rf"`{name}`.*Received: {name}="
    ):
        model.enable_relora(**{"rank": 2, "experts": 2, **kwargs})
    tm.assert_unchanged(model, before)
    assert keras_relora.get_state(model) is None
    assert all(v.trainable for v in model.weights)


def test_enable_relora_accepts_numpy_integers():
    x, _ = tm.dense_data()
    model = functional(x)
    model.enable_relora(
        rank=np.int64(2),
        experts=np.int32(2),
        top_k=np.int64(1),
        alpha=np.float32(4.0),
    )
    state = keras_relora.get_state(model)
    assert state.settings["rank"] == 2
    assert type(state.settings["rank"]) is int
    assert type(state.settings["top_k"]) is int
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(model(x)))


def test_received_values_are_printed_with_repr():
    x, _ = tm.dense_data()
    with pytest.raises(ValueError, match=r"Received: rank='4'"):
        functional(x).enable_relora(rank="4")


def test_layers_refuse_bools_and_accept_numpy_integers():
    with pytest.raises(ValueError, match=r"Received: rank=True"):
        keras_relora.SharedLoraA(4, rank=True)
    with pytest.raises(ValueError, match=r"Received: input_dim=True"):
        keras_relora.SharedLoraA(True, rank=2)
    shared = keras_relora.SharedLoraA(np.int64(4), rank=np.int64(2))
    assert shared.rank == 2 and type(shared.rank) is int
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    with pytest.raises(ValueError, match=r"Received: experts=True"):
        keras_relora.ReloraDense(dense, shared, experts=True)
    with pytest.raises(ValueError, match=r"Received: alpha=inf"):
        keras_relora.ReloraDense(dense, shared, alpha=float("inf"))
    with pytest.raises(TypeError, match=r"Received: dropout=.0.1."):
        keras_relora.ReloraDense(dense, shared, dropout="0.1")
    adapter = keras_relora.ReloraDense(
        dense, shared, experts=np.int64(2), top_k=np.int64(1)
    )
    assert adapter.experts == 2 and type(adapter.experts) is int


# Loading a `.keras` file without `import keras_relora`.


def test_loading_without_the_import_names_keras_relora(tmp_path):
    x, _ = tm.dense_data()
    model = functional(x, rank=2, experts=2)
    path = str(tmp_path / "adapted.keras")
    model.save(path)
    code = (
        "import keras, sys\n"
        "try:\n"
        f"    keras.models.load_model({path!r})\n"
        "except Exception as error:\n"
        "    print('ERROR', type(error).__name__, str(error)[:2000])\n"
        "    sys.exit(3)\n"
        "print('LOADED', 'keras_relora' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    out = done.stdout
    if done.returncode == 3:
        assert "keras_relora" in out and "import" in out, out
        assert "module': 'keras_relora" in out, out
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert "LOADED True" in out, out
