"""Named adapters in files: one adapter per `.safetensors` file, `.keras`
files of several adapters, merging one adapter, combining adapters."""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops
from test_named_adapters import DEFAULT
from test_named_adapters import SMALL
from test_named_adapters import alone
from test_named_adapters import group_variables
from test_named_adapters import reference
from test_named_adapters import two_adapter_model
from test_named_adapters import values

import keras_relora


def numpy(x):
    return ops.convert_to_numpy(x)


def read_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in sorted(f.keys())}


def fresh_base(base):
    model = tm.functional_model()
    for variable, value in zip(model.weights, base, strict=True):
        variable.assign(value)
    return model


# -- 1. adapter files per named adapter ----------------------------------


def test_each_adapter_saves_as_the_file_of_that_adapter_alone(tmp_path):
    model, base = two_adapter_model()
    default_ref = reference(
        base, "default", values(group_variables(model, "default")), **DEFAULT
    )
    small_ref = reference(
        base, "small", values(group_variables(model, "small")), **SMALL
    )
    model.save_relora_weights(tmp_path / "default.safetensors")
    keras_relora.save_relora_weights(
        model, tmp_path / "small.safetensors", adapter_name="small"
    )
    assert keras_relora.active_adapter(model) == "default"
    default_ref.save_relora_weights(tmp_path / "default_ref.safetensors")
    small_ref.save_relora_weights(tmp_path / "small_ref.safetensors")
    # The same header and tensors (the header's key order is not fixed).
    for name in ("default", "small"):
        written = read_file(tmp_path / f"{name}.safetensors")
        alone_file = read_file(tmp_path / f"{name}_ref.safetensors")
        assert written[0] == alone_file[0]
        assert list(written[1]) == list(alone_file[1])
        for key, value in written[1].items():
            assert value.dtype == alone_file[1][key].dtype
            np.testing.assert_array_equal(value, alone_file[1][key])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.save_relora_weights(
            tmp_path / "x.safetensors", adapter_name="nope"
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_files_load_as_named_adapters(tmp_path):
    model, base = two_adapter_model()
    x, _ = tm.dense_data()
    model.save_relora_weights(tmp_path / "default.safetensors")
    model.save_relora_weights(tmp_path / "small.safetensors", "small")
    expected = {n: alone(model, n, x) for n in ("default", "small")}
    # Into a model without adapters: "default", then a new name.
    loaded = fresh_base(base)
    loaded.load_relora_weights(tmp_path / "default.safetensors")
    loaded.load_relora_weights(
        tmp_path / "small.safetensors", adapter_name="small"
    )
    assert keras_relora.adapter_names(loaded) == ["default", "small"]
    assert keras_relora.active_adapter(loaded) == "default"
    for name in ("default", "small"):
        np.testing.assert_array_equal(alone(loaded, name, x), expected[name])
    # A file of "small" as the first adapter of a model, named otherwise.
    other = fresh_base(base)
    keras_relora.load_relora_weights(
        other, tmp_path / "small.safetensors", adapter_name="task"
    )
    assert keras_relora.adapter_names(other) == ["task"]
    assert other.get_layer("head").relora_task.rank == 2
    np.testing.assert_array_equal(numpy(other(x)), expected["small"])
    # Into an existing adapter of that name, not the active one.
    tm.randomize_adapters(loaded, seed=7)  # changes "default" only
    keras_relora.set_adapter(loaded, "small")
    tm.randomize_adapters(loaded, seed=8)
    keras_relora.set_adapter(loaded, "default")
    kept = values(group_variables(loaded, "default"))
    loaded.load_relora_weights(tmp_path / "small.safetensors", "small")
    assert keras_relora.active_adapter(loaded) == "default"
    np.testing.assert_array_equal(alone(loaded, "small", x), expected["small"])
    for value, want in zip(
        values(group_variables(loaded, "default")), kept, strict=True
    ):
        np.testing.assert_array_equal(value, want)


def test_a_file_of_other_settings_refuses_and_changes_nothing(tmp_path):
    model, base = two_adapter_model()
    model.save_relora_weights(tmp_path / "default.safetensors")
    before = tm.snapshot(model)
    with pytest.raises(ValueError, match=r"rank: file 4, model 2"):
        model.load_relora_weights(
            tmp_path / "default.safetensors", adapter_name="small"
        )
    tm.assert_unchanged(model, before)
    assert keras_relora.active_adapter(model) == "default"
    # A new name with a file of another base: refused before enabling.
    keras.utils.set_random_seed(5)
    stranger = tm.functional_model()
    stranger.enable_relora(rank=2, experts=1, adapter_name="mine")
    before = tm.snapshot(stranger)
    with pytest.raises(ValueError, match="another base model"):
        stranger.load_relora_weights(
            tmp_path / "default.safetensors", adapter_name="new"
        )
    tm.assert_unchanged(stranger, before)
    assert keras_relora.adapter_names(stranger) == ["mine"]
    with pytest.raises(ValueError, match="Python identifier"):
        stranger.load_relora_weights(
            tmp_path / "default.safetensors", adapter_name="a b"
        )


# -- 3. `.keras` files of several adapters --------------------------------


def test_keras_file_of_several_adapters_round_trips(tmp_path):
    model, _ = two_adapter_model()
    x, y = tm.dense_data()
    keras_relora.set_adapter(model, "small")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    expected = {n: alone(model, n, x) for n in ("default", "small")}
    keras_relora.set_adapter(model, "small")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_relora.adapter_names(loaded) == ["default", "small"]
    assert keras_relora.active_adapter(loaded) == "small"
    tm.assert_unchanged(loaded, tm.snapshot(model))
    np.testing.assert_array_equal(numpy(loaded(x)), expected["small"])
    for name in ("default", "small"):
        np.testing.assert_array_equal(alone(loaded, name, x), expected[name])
    # The optimizer's state, less the adapter mask that `fit` adds.
    saved = [
        v for v in model.optimizer.variables if not v.name.startswith("relora")
    ]
    assert len(loaded.optimizer.variables) == len(saved) > 10
    for a, b in zip(loaded.optimizer.variables, saved, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(numpy(a), numpy(b))
    # It trains the active adapter alone.
    keras_relora.set_adapter(loaded, "default")
    small = values(group_variables(loaded, "small"))
    loaded.fit(x, y, epochs=1, verbose=0)
    for value, want in zip(
        values(group_variables(loaded, "small")), small, strict=True
    ):
        np.testing.assert_array_equal(value, want)


def test_keras_file_of_a_keras_hub_task_with_pruned_adapters(tmp_path):
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    data = tm.lm_data()[0]
    lm.enable_relora(rank=4, experts=2, adapter_name="routed")
    tm.randomize_adapters(lm, seed=1)
    lm.enable_relora(rank=2, experts=1, targets=["q", "v"], adapter_name="qv")
    lm.set_adapter("qv")
    tm.randomize_adapters(lm, seed=2)
    assert keras_relora.prune(lm, 0.5, importance=[1.0, 0.0]) == [1]
    lm.set_adapter("routed")
    expected = {n: with_adapter(lm, n, data) for n in ("routed", "qv")}
    assert np.abs(expected["routed"] - expected["qv"]).max() > 1e-3
    lm.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert loaded.adapter_names() == ["routed", "qv"]
    assert loaded.active_adapter() == "routed"
    state = keras_relora.get_state(loaded)
    assert [a.pruned for a in state.named["qv"].adapters.values()] == [
        a.block == 1 for a in state.named["qv"].adapters.values()
    ]
    assert not any(a.pruned for a in state.named["routed"].adapters.values())
    tm.assert_unchanged(loaded, tm.snapshot(lm))
    for name in ("routed", "qv"):
        np.testing.assert_array_equal(
            with_adapter(loaded, name, data), expected[name]
        )


def with_adapter(model, name, data):
    previous = keras_relora.active_adapter(model)
    keras_relora.set_adapter(model, name)
    try:
        return numpy(model(data))
    finally:
        keras_relora.set_adapter(model, previous)


# -- 4. merging one named adapter -----------------------------------------


def test_merge_one_named_adapter():
    model, base = two_adapter_model()
    x, _ = tm.dense_data()
    before = tm.snapshot(model)
    merged = keras_relora.merge_relora(model, adapter_name="small")
    assert keras_relora.get_state(merged) is None
    assert len(merged.weights) == len(base)
    np.testing.assert_allclose(
        numpy(merged(x)), alone(model, "small", x), 0, 1e-5
    )
    assert keras_relora.active_adapter(model) == "default"
    tm.assert_unchanged(model, before)
    # The kernels are the base's plus that adapter's, not another's.
    np.testing.assert_array_equal(numpy(merged.weights[0]), base[0])
    # Each model owns its arrays: JAX's compiled predict donates its state.
    merged.predict(x, verbose=0)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), alone(model, "default", x)
    )
    # "default" has routed experts: refused without calibration data.
    with pytest.raises(ValueError, match="needs `calibration_data`"):
        keras_relora.merge_relora(model)
    merged, error = keras_relora.merge_relora(
        model, x, verbose=False, return_error=True
    )
    assert error["samples"] == len(x)
    live = alone(model, "default", x)
    np.testing.assert_allclose(numpy(merged(x)), live, 0, error["max_abs"])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        keras_relora.merge_relora(model, adapter_name="nope")
    tm.assert_unchanged(model, before)


# -- 5. combining adapters -------------------------------------------------


def mixed(model, mix, x):
    """`model(x)` with the selector weighting adapter `n` by `mix[n]`
    (unlisted: 0): `base + sum_n mix[n] * delta_n` at every layer."""
    state = keras_relora.get_state(model)
    saved = numpy(state.selector.mix).copy()
    names = list(state.named)
    vector = np.zeros(len(names), "float32")
    for name, weight in mix.items():
        vector[names.index(name)] = weight
    state.selector.mix.assign(vector)
    try:
        return numpy(model(x))
    finally:
        state.selector.mix.assign(saved)


def one_dense_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(5, name="only")(inputs))
    return model


def test_combination_of_one_layer_is_the_weighted_sum_of_outputs():
    model = one_dense_model()
    x, _ = tm.dense_data()
    base = numpy(model(x))
    model.enable_relora(rank=2, experts=1, share_a="layer", adapter_name="a")
    tm.randomize_adapters(model, seed=1)
    model.enable_relora(rank=3, experts=2, alpha=5.0, adapter_name="b")
    model.set_adapter("b")
    tm.randomize_adapters(model, seed=2)
    keras_relora.get_state(model).adapters[
        next(iter(keras_relora.get_state(model).adapters))
    ].suppression.assign(0.5)
    outputs = {n: with_adapter(model, n, x) for n in ("a", "b")}
    model.set_adapter("a")
    keras_relora.combine_adapters(model, {"a": 0.7, "b": -1.3}, "ab")
    assert model.active_adapter() == "a"
    state = keras_relora.get_state(model)
    assert state.named["ab"].settings["rank"] == 5  # concatenated
    assert state.named["ab"].settings["experts"] == 2
    expected = base + 0.7 * (outputs["a"] - base) - 1.3 * (outputs["b"] - base)
    np.testing.assert_allclose(with_adapter(model, "ab", x), expected, 0, 1e-5)
    np.testing.assert_array_equal(with_adapter(model, "a", x), outputs["a"])


def test_combination_matches_the_weighted_adapters_at_every_layer():
    model, _ = two_adapter_model()  # "default" routed, "small" plain
    x, _ = tm.dense_data()
    before = {n: with_adapter(model, n, x) for n in ("default", "small")}
    model.combine_adapters({"default": 0.5, "small": 2.0}, "both")
    assert model.adapter_names() == ["default", "small", "both"]
    settings = keras_relora.get_state(model).named["both"].settings
    assert (settings["rank"], settings["experts"]) == (6, 2)
    assert settings["share_a"] == "role"
    reference_out = mixed(model, {"default": 0.5, "small": 2.0}, x)
    np.testing.assert_allclose(
        with_adapter(model, "both", x), reference_out, 0, 1e-5
    )
    for name in ("default", "small"):
        np.testing.assert_array_equal(
            with_adapter(model, name, x), before[name]
        )


def test_adapters_with_the_same_a_and_router_combine_linearly():
    keras.utils.set_random_seed(0)
    model = tm.functional_model()
    x, _ = tm.dense_data()
    model.enable_relora(rank=2, experts=2, share_a="layer")
    tm.randomize_adapters(model, seed=1)
    model.enable_relora(rank=2, experts=2, share_a="layer", adapter_name="b")
    model.set_adapter("b")
    tm.randomize_adapters(model, seed=2)
    state = keras_relora.get_state(model)
    for path, adapter in state.named["b"].adapters.items():
        first = state.named["default"].adapters[path]
        adapter.shared_a.kernel.assign(first.shared_a.kernel)
        adapter.router_kernel.assign(first.router_kernel)
    model.combine_adapters({"default": 0.25, "b": 0.75}, "ab")
    settings = state.named["ab"].settings
    assert (settings["rank"], settings["experts"]) == (2, 2)  # linear
    np.testing.assert_allclose(
        with_adapter(model, "ab", x),
        mixed(model, {"default": 0.25, "b": 0.75}, x),
        0,
        1e-5,
    )


def test_different_routers_refuse_and_change_nothing():
    keras.utils.set_random_seed(0)
    model = tm.functional_model()
    model.enable_relora(rank=2, experts=2)
    model.enable_relora(rank=2, experts=2, adapter_name="other")
    tm.randomize_adapters(model, seed=1)
    before = tm.snapshot(model)
    with pytest.raises(
        ValueError, match=r"adapters 'default' and 'other' exactly.*router"
    ):
        model.combine_adapters({"default": 1.0, "other": 1.0}, "both")
    tm.assert_unchanged(model, before)
    assert model.adapter_names() == ["default", "other"]
    with pytest.raises(ValueError, match="already an adapter"):
        model.combine_adapters({"default": 1.0}, "other")
    with pytest.raises(ValueError, match="does not have"):
        model.combine_adapters({"nope": 1.0}, "both")
    with pytest.raises(ValueError, match="finite real number"):
        model.combine_adapters({"default": float("nan")}, "both")
    with pytest.raises(TypeError, match="non-empty dict"):
        model.combine_adapters({}, "both")
    tm.assert_unchanged(model, before)
    # One adapter alone, scaled: its router is kept.
    x, _ = tm.dense_data()
    model.combine_adapters({"other": -2.0}, "minus")
    with keras_relora.disable_adapters(model):
        base = numpy(model(x))
    expected = base - 2.0 * (with_adapter(model, "other", x) - base)
    np.testing.assert_allclose(
        with_adapter(model, "minus", x), expected, 0, 1e-5
    )


# -- 2. PEFT folders of named adapters -------------------------------------


def two_lora_lm():
    """A tiny Llama 3 CausalLM with "default" (`lora`, q and v) and "qv"
    (`sharelora`, rank 2, q, k, v), both non-zero; and its base."""
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    base = [numpy(v).copy() for v in lm.weights]
    lm.enable_relora(rank=4, experts=1, share_a="layer", targets=["q", "v"])
    tm.randomize_adapters(lm, seed=1)
    lm.enable_relora(
        rank=2, experts=1, alpha=3.0, targets=["q", "k", "v"], adapter_name="qv"
    )
    lm.set_adapter("qv")
    tm.randomize_adapters(lm, seed=2)
    lm.set_adapter("default")
    return lm, base


def fresh_lm(base):
    lm = tm.llama3_causal_lm()
    for variable, value in zip(lm.weights, base, strict=True):
        variable.assign(value)
    return lm


def test_peft_folders_of_named_adapters(tmp_path):
    lm, base = two_lora_lm()
    data = tm.lm_data()[0]
    expected = {n: with_adapter(lm, n, data) for n in ("default", "qv")}
    folder = tmp_path / "peft"
    keras_relora.save_peft(lm, folder)  # PEFT's layout: every adapter
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "qv" / "adapter_model.safetensors").is_file()
    loaded = fresh_lm(base)
    keras_relora.load_peft(loaded, folder)  # the root: "default"
    keras_relora.load_peft(loaded, folder, adapter_name="qv")  # folder/qv
    assert loaded.adapter_names() == ["default", "qv"]
    assert loaded.active_adapter() == "default"
    for name in ("default", "qv"):
        np.testing.assert_allclose(
            with_adapter(loaded, name, data), expected[name], 0, 1e-5
        )
    # One adapter alone, where PEFT puts it; loaded into an existing one.
    keras_relora.save_peft(lm, tmp_path / "one", adapter_name="qv")
    assert not (tmp_path / "one" / "adapter_config.json").exists()
    loaded.set_adapter("qv")
    tm.randomize_adapters(loaded, seed=9)
    loaded.set_adapter("default")
    kept = tm.snapshot(loaded)
    keras_relora.load_peft(loaded, tmp_path / "one", adapter_name="qv")
    assert loaded.active_adapter() == "default"
    np.testing.assert_allclose(
        with_adapter(loaded, "qv", data), expected["qv"], 0, 1e-5
    )
    changed = [v.path for v in group_variables(loaded, "qv")]
    assert changed
    for path, value in tm.snapshot(loaded).items():
        if path not in changed:
            np.testing.assert_array_equal(value, kept[path], err_msg=path)


def test_peft_refusals_of_named_adapters(tmp_path):
    lm, _ = two_lora_lm()
    lm.enable_relora(rank=2, experts=2, targets=["q"], adapter_name="routed")
    folder = tmp_path / "peft"
    with pytest.raises(
        ValueError, match=r"Adapter 'routed' cannot be written.*experts=2"
    ):
        keras_relora.save_peft(lm, folder)
    assert not folder.exists()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        keras_relora.save_peft(lm, folder, adapter_name=["qv", "nope"])
    assert not folder.exists()
    keras_relora.save_peft(lm, folder, adapter_name=["default", "qv"])
    before = tm.snapshot(lm)
    # "qv" (rank 2, sharelora) into "default" (rank 4): refused.
    with pytest.raises(ValueError, match=r"rank: folder 2, model 4"):
        keras_relora.load_peft(lm, folder / "qv", adapter_name="default")
    with pytest.raises(ValueError, match=r"experts: folder 1.*model 2"):
        keras_relora.load_peft(lm, folder, adapter_name="routed")
    tm.assert_unchanged(lm, before)
    assert lm.adapter_names() == ["default", "qv", "routed"]
    assert lm.active_adapter() == "default"


def test_weights_file_of_several_adapters(tmp_path):
    model, base = two_adapter_model()
    x, _ = tm.dense_data()
    keras_relora.set_adapter(model, "small")
    model.save_weights(tmp_path / "model.weights.h5")
    saved = values(model.weights)
    other = fresh_base(base)
    other.enable_relora(**DEFAULT)
    other.enable_relora(**SMALL, adapter_name="small")
    other.load_weights(tmp_path / "model.weights.h5")
    for value, want in zip(values(other.weights), saved, strict=True):
        np.testing.assert_array_equal(value, want)
    assert other.active_adapter() == "small"
    np.testing.assert_array_equal(numpy(other(x)), numpy(model(x)))
    # Other adapters than the file's: refused before loading.
    third = fresh_base(base)
    third.enable_relora(**DEFAULT)
    third.enable_relora(**SMALL, adapter_name="tiny")
    before = tm.snapshot(third)
    with pytest.raises(ValueError, match=r"named adapters: file \['default'"):
        third.load_weights(tmp_path / "model.weights.h5")
    tm.assert_unchanged(third, before)


def test_combination_on_a_keras_hub_task():
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    data = tm.lm_data()[0]
    lm.enable_relora(rank=4, experts=2, router_input="input")
    tm.randomize_adapters(lm, seed=1)
    lm.enable_relora(rank=2, experts=1, targets=["q", "v"], adapter_name="qv")
    lm.set_adapter("qv")
    tm.randomize_adapters(lm, seed=2)
    lm.set_adapter("default")
    lm.combine_adapters({"default": 1.5, "qv": -0.5}, "both")
    settings = keras_relora.get_state(lm).named["both"].settings
    assert (settings["rank"], settings["experts"]) == (6, 2)
    assert settings["router_input"] == "input"
    np.testing.assert_allclose(
        with_adapter(lm, "both", data),
        mixed(lm, {"default": 1.5, "qv": -0.5}, data),
        0,
        1e-5,
    )
