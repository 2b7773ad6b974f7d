"""Adapter-only checkpoints: round trips and every refusal."""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models as tm

import keras_relora
from keras_relora.adapt import model_class
from keras_relora.reducer.reducer_state import reducer_state
from keras_relora.saving import adapter_file


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def base_weights(model):
    state = keras_relora.get_state(model)
    relora = {id(v) for v in state.variables().values()} if state else set()
    return [to_numpy(v) for v in model.weights if id(v) not in relora]


def copy_of_base(trained, build=tm.llama3_backbone):
    """A new, plain model with the base weights of `trained`."""
    model = build()
    for variable, value in zip(
        model.weights, base_weights(trained), strict=False
    ):
        variable.assign(value)
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A small functional model with routed adapters, and its file."""
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(model)
    path = tmp_path_factory.mktemp("ckpt") / "dense.safetensors"
    model.save_relora_weights(path)
    return {"model": model, "path": path, "x": x, "y": to_numpy(model(x))}


def copy_of_dense(dense):
    return copy_of_base(dense["model"], build=tm.functional_model)


def adapter_values(model):
    state = keras_relora.get_state(model)
    return {k: to_numpy(v) for k, v in state.variables().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tm.llama3_backbone()
    model.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(model)
    x = tm.token_batch()
    path = tmp_path_factory.mktemp("ckpt") / "adapters.safetensors"
    keras_relora.save_relora_weights(model, path)
    return {"model": model, "path": path, "x": x, "y": to_numpy(model(x))}


def test_load_into_plain_model_enables_and_matches(trained):
    model = copy_of_base(trained["model"])
    assert keras_relora.load_relora_weights(model, trained["path"]) is model
    state = keras_relora.get_state(model)
    saved = keras_relora.get_state(trained["model"]).settings
    assert state.settings["targets"] == saved["targets"]
    assert (state.settings["rank"], state.settings["experts"]) == (2, 2)
    np.testing.assert_array_equal(to_numpy(model(trained["x"])), trained["y"])


def test_load_into_adapted_model_with_method(trained, tmp_path):
    model = copy_of_base(trained["model"])
    model.enable_relora(rank=2, experts=2)
    model.load_relora_weights(trained["path"])
    np.testing.assert_array_equal(to_numpy(model(trained["x"])), trained["y"])
    # And the method form of saving writes the same tensors.
    path = tmp_path / "again.safetensors"
    model.save_relora_weights(path)
    _, _, a = adapter_file.read(path)
    _, _, b = adapter_file.read(trained["path"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_file_is_keyed_by_layer_path(trained):
    relora, base, tensors = adapter_file.read(trained["path"])
    assert "adapters/transformer_layer_1/self_attention/query/b_kernel" in (
        tensors
    )
    assert tensors["shared_a/q:8/kernel"].shape == (8, 2)
    assert relora["settings"]["rank"] == 2
    assert base["class"] == "Llama3Backbone"


MISMATCHED = {
    "rank": (dict(rank=4, experts=2), "rank: file 2, model 4"),
    "experts": (dict(rank=2, experts=3), "experts: file 2, model 3"),
    "alpha": (dict(rank=2, experts=2, alpha=8.0), "alpha: file 2.0"),
    "targets": (
        dict(rank=2, experts=2, targets=["hidden"]),
        "targets in the file, not adapted: ['head']",
    ),
    "share_a": (dict(rank=2, experts=2, share_a="layer"), "share_a"),
    "router": (dict(rank=2, experts=2, router_input="input"), "router_input"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_refuses_other_settings_and_leaves_model(dense, case):
    kwargs, expected = MISMATCHED[case]
    model = copy_of_dense(dense)
    model.enable_relora(**kwargs)
    tm.randomize_adapters(model, seed=1)
    before = adapter_values(model)
    y = to_numpy(model(dense["x"]))
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        model.load_relora_weights(dense["path"])
    assert expected in str(info.value)
    after = adapter_values(model)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    np.testing.assert_array_equal(to_numpy(model(dense["x"])), y)


def assert_untouched_plain(model, x, y, cls=keras_hub.models.Llama3Backbone):
    assert keras_relora.get_state(model) is None
    assert type(model) is cls
    assert not any("relora" in v.path for v in model.weights)
    np.testing.assert_array_equal(to_numpy(model(x)), y)


def test_refuses_another_base_model(trained):
    x = trained["x"]
    # Another architecture: one block fewer.
    small = tm.llama3_backbone(num_layers=1)
    y = to_numpy(small(x))
    with pytest.raises(ValueError, match="transformer_layer_1"):
        small.load_relora_weights(trained["path"])
    assert keras_relora.get_state(small) is None
    np.testing.assert_array_equal(to_numpy(small(x)), y)
    # Another kind of model.
    dense_model = tm.functional_model()
    with pytest.raises(ValueError, match="base model: file Llama3Backbone"):
        dense_model.load_relora_weights(trained["path"])
    assert keras_relora.get_state(dense_model) is None
    # Same architecture, other weights: refused unless check_base=False.
    other = tm.llama3_backbone()
    y = to_numpy(other(x))
    with pytest.raises(ValueError, match="check_base=False"):
        other.load_relora_weights(trained["path"])
    assert_untouched_plain(other, x, y)
    other.load_relora_weights(trained["path"], check_base=False)
    assert keras_relora.get_state(other) is not None


def corrupt(data, how):
    data = bytearray(data)
    if how == "truncated":
        return bytes(data[: len(data) // 2])
    if how == "tensor_byte":
        data[-5] ^= 0xFF
        return bytes(data)
    if how == "header_byte":
        data[12] = ord("#")
        return bytes(data)
    if how == "empty":
        return b""
    raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "tensor_byte", "header_byte", "empty"]
)
def test_refuses_broken_file(dense, tmp_path, how):
    path = tmp_path / f"{how}.safetensors"
    path.write_bytes(corrupt(dense["path"].read_bytes(), how))
    x = dense["x"]
    plain = copy_of_dense(dense)
    y = to_numpy(plain(x))
    with pytest.raises(ValueError, match="not a valid keras_relora"):
        plain.load_relora_weights(path)
    functional = model_class.base_class(dense["model"])
    assert_untouched_plain(plain, x, y, cls=functional)
    adapted = copy_of_dense(dense)
    adapted.enable_relora(rank=2, experts=2)
    before = adapter_values(adapted)
    with pytest.raises(ValueError, match="not a valid keras_relora"):
        adapted.load_relora_weights(path)
    for key, value in adapter_values(adapted).items():
        np.testing.assert_array_equal(value, before[key])


def test_refuses_bad_paths(dense, tmp_path):
    with pytest.raises(ValueError, match="must end in `.safetensors`"):
        dense["model"].save_relora_weights(tmp_path / "a.weights.h5")
    model = tm.functional_model()
    with pytest.raises(ValueError, match="enable_relora"):
        keras_relora.save_relora_weights(model, tmp_path / "a.safetensors")
    import safetensors.numpy

    other = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3, "float32")}, str(other))
    with pytest.raises(ValueError, match="format is None"):
        model.load_relora_weights(other)


def test_pruned_blocks_and_reducer_scores_round_trip(tmp_path):
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2, share_a="layer")
    tm.randomize_adapters(model)
    reducer = reducer_state(model, create_seed=7)
    reducer.scores.assign(np.arange(3, dtype="float32"))
    keras_relora.prune(model, 1 / 3, strategy="random", seed=0)
    pruned = sorted(
        p for p, a in keras_relora.get_state(model).adapters.items() if a.pruned
    )
    assert len(pruned) == 1
    y = to_numpy(model(x))
    path = tmp_path / "pruned.safetensors"
    model.save_relora_weights(path)

    fresh = copy_of_base(model, build=tm.functional_model)
    fresh.load_relora_weights(path)
    state = keras_relora.get_state(fresh)
    assert sorted(p for p, a in state.adapters.items() if a.pruned) == pruned
    np.testing.assert_array_equal(to_numpy(fresh(x)), y)
    restored = reducer_state(fresh)
    np.testing.assert_array_equal(to_numpy(restored.scores), [0, 1, 2])
    assert int(to_numpy(restored.seed)) == 7

    # A model whose adapters are not pruned refuses the pruned file.
    unpruned = copy_of_base(model, build=tm.functional_model)
    unpruned.enable_relora(rank=2, experts=2, share_a="layer")
    with pytest.raises(ValueError, match="pruned adapters"):
        unpruned.load_relora_weights(path)


def test_task_round_trip(tmp_path):
    x = tm.token_batch()
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=1, targets=["q", "v"])
    tm.randomize_adapters(lm)
    y = to_numpy(lm(x))
    path = tmp_path / "lm.safetensors"
    lm.save_relora_weights(path)
    fresh = keras_hub.models.Llama3CausalLM(
        backbone=copy_of_base(lm), preprocessor=None
    )
    fresh.load_relora_weights(path)
    np.testing.assert_array_equal(to_numpy(fresh(x)), y)
