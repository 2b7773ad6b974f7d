"""Several named adapters on one model: add, switch, disable, delete, fit
one among several, switch without tracing again."""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora

BACKEND = keras.config.backend()


def numpy(x):
    return ops.convert_to_numpy(x)


def values(variables):
    return [numpy(v).copy() for v in variables]


def group_variables(model, name):
    state = keras_relora.get_state(model)
    return list(state.named[name].variables().values())


def base_weights(model):
    return [numpy(v).copy() for v in model.weights]


def two_adapter_model(seed=0):
    """`tm.functional_model()` with "default" (rank 4, 2 experts, every
    Dense) and "small" (rank 2, plain LoRA, `hidden` only), both
    non-zero; returns the model, its base weights and each adapter's
    variable values."""
    keras.utils.set_random_seed(seed)
    model = tm.functional_model()
    base = base_weights(model)
    model.enable_relora(rank=4, experts=2)
    tm.randomize_adapters(model, seed=1)
    model.enable_relora(
        rank=2, experts=1, targets=["head"], adapter_name="small"
    )
    keras_relora.set_adapter(model, "small")
    tm.randomize_adapters(model, seed=2)
    keras_relora.set_adapter(model, "default")
    return model, base


def reference(base, name, adapter_values, **settings):
    """A fresh model with the same base weights and adapter `name` alone,
    holding `adapter_values`: the reference a named adapter must match."""
    model = tm.functional_model()
    for variable, value in zip(model.weights, base, strict=True):
        variable.assign(value)
    model.enable_relora(adapter_name=name, **settings)
    variables = group_variables(model, name)
    for variable, value in zip(variables, adapter_values, strict=True):
        variable.assign(value)
    return model


DEFAULT = dict(rank=4, experts=2)
SMALL = dict(rank=2, experts=1, targets=["head"])


def test_switching_gives_each_adapter_alone():
    model, base = two_adapter_model()
    x, _ = tm.dense_data()
    assert keras_relora.adapter_names(model) == ["default", "small"]
    assert model.adapter_names() == ["default", "small"]
    assert keras_relora.active_adapter(model) == "default"
    default_ref = reference(
        base, "default", values(group_variables(model, "default")), **DEFAULT
    )
    small_ref = reference(
        base, "small", values(group_variables(model, "small")), **SMALL
    )
    with_default = numpy(model(x))
    np.testing.assert_array_equal(with_default, numpy(default_ref(x)))
    model.set_adapter("small")
    assert keras_relora.active_adapter(model) == "small"
    with_small = numpy(model(x))
    np.testing.assert_array_equal(with_small, numpy(small_ref(x)))
    assert np.abs(with_small - with_default).max() > 1e-3
    keras_relora.set_adapter(model, "default")
    np.testing.assert_array_equal(numpy(model(x)), with_default)


def test_adapters_have_their_own_settings_and_paths():
    model, _ = two_adapter_model()
    state = keras_relora.get_state(model)
    small = state.named["small"]
    assert small.settings["rank"] == 2 and small.settings["experts"] == 1
    assert [p.split("/")[-1] for p in small.adapters] == ["head"]
    head = model.get_layer("head")
    assert head.relora.rank == 4 and head.relora_small.rank == 2
    paths = [v.path for v in model.weights]
    assert len(paths) == len(set(paths))
    assert any("relora_small/b_kernel" in p for p in paths)
    # The active adapter's record is what saving and the Reducer read.
    assert state.adapters is state.named["default"].adapters
    keras_relora.set_adapter(model, "small")
    assert state.adapters is small.adapters and state.settings["rank"] == 2


def test_disable_adapters_gives_the_base_outputs():
    keras.utils.set_random_seed(0)
    model = tm.functional_model()
    x, _ = tm.dense_data()
    before = numpy(model(x))
    model.enable_relora(rank=4, experts=2)
    tm.randomize_adapters(model, seed=1)
    model.compile(loss="mse")
    adapted = model.predict(x, verbose=0)
    assert np.abs(adapted - before).max() > 1e-3
    # One adapter (no selector): a flag; compiled functions trace again.
    with keras_relora.disable_adapters(model):
        np.testing.assert_allclose(model.predict(x, verbose=0), before, 0, 1e-6)
        np.testing.assert_allclose(numpy(model(x)), before, 0, 1e-6)
    np.testing.assert_array_equal(model.predict(x, verbose=0), adapted)
    # Several adapters: the selector holds zeros.
    model.enable_relora(rank=2, experts=1, adapter_name="other")
    model.compile(loss="mse")
    np.testing.assert_array_equal(model.predict(x, verbose=0), adapted)
    with model.disable_adapters():
        np.testing.assert_allclose(model.predict(x, verbose=0), before, 0, 1e-6)
    np.testing.assert_array_equal(model.predict(x, verbose=0), adapted)


def test_one_adapter_model_is_unchanged():
    keras.utils.set_random_seed(0)
    named = tm.functional_model()
    named.enable_relora(rank=4, experts=2)
    assert keras_relora.get_state(named).selector is None
    assert not any("selector" in v.path for v in named.weights)
    assert [v.path for v in named.weights if "relora" in v.path] == [
        v.path
        for v in named.weights
        if "/relora/" in v.path or "_relora/" in v.path
    ]


def test_delete_adapter():
    model, _ = two_adapter_model()
    x, _ = tm.dense_data()
    with_default = numpy(model(x))
    count = len(model.weights)
    with pytest.raises(ValueError, match="'default' is active"):
        keras_relora.delete_adapter(model, "default")
    keras_relora.delete_adapter(model, "small")
    assert keras_relora.adapter_names(model) == ["default"]
    assert keras_relora.get_state(model).selector is None
    assert not any(
        "relora_small" in v.path or "selector" in v.path for v in model.weights
    )
    assert len(model.weights) < count
    assert "relora_small" not in dir(model.get_layer("head"))
    np.testing.assert_array_equal(numpy(model(x)), with_default)
    with pytest.raises(ValueError, match="only adapter.*unload"):
        model.delete_adapter("default")
    # A deleted name can be added again.
    model.enable_relora(rank=2, experts=1, adapter_name="small")
    assert model.adapter_names() == ["default", "small"]


def test_unload_removes_every_adapter():
    model, base = two_adapter_model()
    x, _ = tm.dense_data()
    reference_model = tm.functional_model()
    for variable, value in zip(reference_model.weights, base, strict=True):
        variable.assign(value)
    keras_relora.unload(model)
    assert [numpy(v).shape for v in model.weights] == [b.shape for b in base]
    assert "relora_selector" not in dir(model.get_layer("hidden"))
    np.testing.assert_allclose(
        numpy(model(x)), numpy(reference_model(x)), 0, 1e-6
    )


def test_bad_names_and_arguments():
    model, _ = two_adapter_model()
    with pytest.raises(ValueError, match=r"no adapter named 'nope'.*"):
        keras_relora.set_adapter(model, "nope")
    with pytest.raises(ValueError, match=r"Received: adapter_name='nope'"):
        keras_relora.delete_adapter(model, "nope")
    with pytest.raises(ValueError, match="already enabled.*'small'"):
        model.enable_relora(rank=2, adapter_name="small")
    with pytest.raises(ValueError, match="Python identifier.*'a-b'"):
        model.enable_relora(rank=2, adapter_name="a-b")
    with pytest.raises(ValueError, match="enable_relora"):
        keras_relora.adapter_names(tm.functional_model())


def _trace_counting_model():
    """`tm.functional_model()` behind a layer that counts its traces."""
    counts = {"train": 0, "infer": 0}

    class Count(keras.layers.Layer):
        def call(self, x, training=None):
            counts["train" if training else "infer"] += 1
            return x

    keras.utils.set_random_seed(0)
    inner = tm.functional_model()
    inputs = keras.Input((6,))
    model = keras.Model(inputs, inner(Count()(inputs)))
    return model, inner, counts


def test_fit_trains_the_active_adapter_only_without_tracing_again():
    model, inner, counts = _trace_counting_model()
    x, y = tm.dense_data(batch=16)
    model.enable_relora(rank=4, experts=2)
    model.enable_relora(rank=2, experts=1, adapter_name="small")
    base = [numpy(v).copy() for v in model.weights if "relora" not in v.path]
    model.compile(optimizer=keras.optimizers.AdamW(0.05), loss="mse")

    def fit_and_check(active, other):
        keras_relora.set_adapter(model, active)
        before = values(group_variables(model, active))
        frozen = values(group_variables(model, other))
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        after = values(group_variables(model, active))
        b_moved = [
            np.abs(a - b).max() > 0
            for a, b, v in zip(
                after, before, group_variables(model, active), strict=True
            )
            if "b_kernel" in v.path
        ]
        assert b_moved and all(b_moved)
        for value, expected in zip(
            values(group_variables(model, other)), frozen, strict=True
        ):
            np.testing.assert_array_equal(value, expected)

    fit_and_check("default", "small")
    traced = dict(counts)
    # "default" has Adam moments now: AdamW would move it with a zero
    # gradient, and its weight decay too.
    fit_and_check("small", "default")
    fit_and_check("default", "small")
    now = [numpy(v) for v in model.weights if "relora" not in v.path]
    for value, expected in zip(now, base, strict=True):
        np.testing.assert_array_equal(value, expected)
    if BACKEND != "torch":
        assert counts["train"] == traced["train"]


def test_switching_does_not_trace_predict_again():
    model, inner, counts = _trace_counting_model()
    x, _ = tm.dense_data(batch=8)
    model.enable_relora(rank=4, experts=2)
    tm.randomize_adapters(model, seed=1)
    model.enable_relora(
        rank=4, experts=2, adapter_name="second", targets=["head"]
    )
    keras_relora.set_adapter(model, "second")
    tm.randomize_adapters(model, seed=2)
    keras_relora.set_adapter(model, "default")
    model.compile(loss="mse")
    first = model.predict(x, batch_size=8, verbose=0)
    traced = counts["infer"]
    selector = keras_relora.get_state(model).selector
    ids = [id(v) for v in model.weights]
    if BACKEND == "torch":
        pointer = selector.mix.value.data_ptr()
    model.set_adapter("second")
    second = model.predict(x, batch_size=8, verbose=0)
    model.set_adapter("default")
    again = model.predict(x, batch_size=8, verbose=0)
    assert np.abs(second - first).max() > 1e-3
    np.testing.assert_array_equal(again, first)
    assert [id(v) for v in model.weights] == ids
    if BACKEND == "torch":
        assert selector.mix.value.data_ptr() == pointer
    else:
        assert counts["infer"] == traced
    eager = numpy(model_with("second", model, x))
    np.testing.assert_allclose(second, eager, 0, 1e-6)


def model_with(name, model, x):
    """`model(x)` eagerly with adapter `name` active, then "default"."""
    keras_relora.set_adapter(model, name)
    try:
        return model(x)
    finally:
        keras_relora.set_adapter(model, "default")


def test_keras_hub_task_two_adapters():
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    data = tm.lm_data()[0]
    base = numpy(lm(data))
    lm.enable_relora(rank=4, experts=2)
    tm.randomize_adapters(lm, seed=1)
    first = numpy(lm(data))
    lm.enable_relora(rank=2, experts=1, targets=["q", "v"], adapter_name="qv")
    np.testing.assert_array_equal(numpy(lm(data)), first)
    lm.set_adapter("qv")
    np.testing.assert_allclose(numpy(lm(data)), base, 0, 1e-6)  # B = 0
    tm.randomize_adapters(lm, seed=2)
    assert np.abs(numpy(lm(data)) - first).max() > 1e-3
    with lm.disable_adapters():
        np.testing.assert_allclose(numpy(lm(data)), base, 0, 1e-6)
    lm.set_adapter("default")
    np.testing.assert_array_equal(numpy(lm(data)), first)


def alone(model, name, x):
    """`model(x)` with adapter `name` active (None: adapters disabled)."""
    if name is None:
        with keras_relora.disable_adapters(model):
            return numpy(model(x))
    keras_relora.set_adapter(model, name)
    try:
        return numpy(model(x))
    finally:
        keras_relora.set_adapter(model, "default")


def test_route_examples_matches_each_example_alone():
    model, _ = two_adapter_model()
    x, _ = tm.dense_data(batch=5)
    ids = ["small", "default", None, 1, "small"]
    names = ["small", "default", None, "small", "small"]
    expected = np.concatenate(
        [alone(model, n, x[i : i + 1]) for i, n in enumerate(names)]
    )
    model.compile(loss="mse")
    outside = model.predict(x, batch_size=5, verbose=0)
    with keras_relora.route_examples(model, ids):
        np.testing.assert_allclose(numpy(model(x)), expected, 0, 1e-5)
        routed = model.predict(x, batch_size=5, verbose=0)
        with pytest.raises(ValueError, match="batch has 4 examples"):
            model(x[:4])
    np.testing.assert_allclose(routed, expected, 0, 1e-5)
    np.testing.assert_array_equal(
        model.predict(x, batch_size=5, verbose=0), outside
    )
    with pytest.raises(ValueError, match=r"adapter_ids\[1\].*'nope'"):
        with model.route_examples(["small", "nope"]):
            pass
    with pytest.raises(TypeError, match="one entry per example"):
        with model.route_examples("small"):
            pass


def test_route_examples_on_a_keras_hub_task():
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm()
    data = tm.lm_data()[0]
    lm.enable_relora(rank=4, experts=2)
    tm.randomize_adapters(lm, seed=1)
    lm.enable_relora(rank=2, experts=1, targets=["q", "v"], adapter_name="qv")
    lm.set_adapter("qv")
    tm.randomize_adapters(lm, seed=2)
    lm.set_adapter("default")
    ids = ["qv", "default", "qv", None]
    expected = np.concatenate(
        [
            alone(lm, n, {k: v[i : i + 1] for k, v in data.items()})
            for i, n in enumerate(ids)
        ]
    )
    with lm.route_examples(ids):
        routed = lm.predict(data, batch_size=4, verbose=0)
    np.testing.assert_allclose(routed, expected, 0, 1e-5)
