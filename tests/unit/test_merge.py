"""`merge_relora` and `unload`."""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models as tm

import keras_relora


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_plain(model):
    """No keras_relora layer, variable, state or class is left."""
    assert keras_relora.get_state(model) is None
    for layer in model._flatten_layers(include_self=True):
        assert type(layer).__module__.split(".")[0] != "keras_relora"
        assert getattr(type(layer), "_relora_base_class", None) is None
        assert "relora" not in layer.__dict__
    assert not any("relora" in v.path for v in model.variables)


def test_exact_merge_of_a_backbone_saves_as_preset(tmp_path):
    x = tm.token_batch()
    backbone = tm.llama3_backbone()
    backbone.enable_relora(rank=2, experts=1, alpha=4.0)
    tm.randomize_adapters(backbone)
    y = to_numpy(backbone(x))

    merged = keras_relora.merge_relora(backbone)
    assert type(merged) is keras_hub.models.Llama3Backbone
    assert_plain(merged)
    np.testing.assert_allclose(to_numpy(merged(x)), y, rtol=1e-5, atol=1e-5)
    # The input model is not changed.
    assert keras_relora.get_state(backbone) is not None
    np.testing.assert_array_equal(to_numpy(backbone(x)), y)

    preset = str(tmp_path / "preset")
    merged.save_to_preset(preset)
    restored = keras_hub.models.Llama3Backbone.from_preset(preset)
    assert type(restored) is keras_hub.models.Llama3Backbone
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(merged(x)))
    merged.save(tmp_path / "merged.keras")
    loaded = keras.models.load_model(tmp_path / "merged.keras")
    assert type(loaded) is keras_hub.models.Llama3Backbone
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(merged(x)))


def test_exact_merge_of_a_task_and_dense_activations():
    x = tm.token_batch()
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=1, targets=["q", "up", "down"])
    tm.randomize_adapters(lm)
    merged = keras_relora.merge_relora(lm)
    assert type(merged) is keras_hub.models.Llama3CausalLM
    assert_plain(merged)
    np.testing.assert_allclose(
        to_numpy(merged(x)), to_numpy(lm(x)), rtol=1e-5, atol=1e-5
    )
    # A functional model whose Dense layers have activations (the delta
    # goes in before them) and one A per layer.
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=3, experts=1, share_a="layer")
    tm.randomize_adapters(model)
    merged = keras_relora.merge_relora(model)
    assert_plain(merged)
    np.testing.assert_allclose(
        to_numpy(merged(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )


def test_merge_keeps_tied_embeddings_through_a_preset(tmp_path):
    # keras-hub's Llama backbones leave `tie_word_embeddings` out of their
    # config (SmolLM2 ties them): the merge must not rebuild an untied head.
    x = tm.token_batch()
    lm = tm.llama3_causal_lm(tie_word_embeddings=True)
    num_base_weights = len(lm.weights)
    lm.enable_relora(rank=2, experts=1)
    tm.randomize_adapters(lm)
    merged = keras_relora.merge_relora(lm)
    assert type(merged) is keras_hub.models.Llama3CausalLM
    assert merged.backbone.tie_word_embeddings
    assert len(merged.weights) == num_base_weights
    y = to_numpy(lm(x))
    np.testing.assert_allclose(to_numpy(merged(x)), y, rtol=1e-5, atol=1e-5)
    preset = str(tmp_path / "preset")
    merged.save_to_preset(preset)
    restored = keras_hub.models.CausalLM.from_preset(preset)
    assert restored.backbone.tie_word_embeddings
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(merged(x)))


def test_merge_keeps_the_tokenizer_through_a_preset(tmp_path):
    # A keras-hub tokenizer's vocabulary is an asset, not config: the
    # rebuilt model's tokenizer must get it, or the merged task cannot
    # preprocess text, generate or be saved as a preset.
    lm = tm.llama3_causal_lm_with_preprocessor(tm.byte_tokenizer(), 16)
    lm.enable_relora(rank=2, experts=1)
    tm.randomize_adapters(lm)
    merged = keras_relora.merge_relora(lm)
    text = ["a cat do dogs"]
    expected = lm.preprocessor(text)[0]  # (x, y, sample_weight)
    got = merged.preprocessor(text)[0]
    assert merged.preprocessor.tokenizer is not lm.preprocessor.tokenizer
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(
            to_numpy(got[key]), to_numpy(expected[key])
        )
    x = {k: v[:, :8] for k, v in expected.items()}
    np.testing.assert_allclose(
        to_numpy(merged(x)), to_numpy(lm(x)), rtol=1e-5, atol=1e-5
    )
    preset = str(tmp_path / "preset")
    merged.save_to_preset(preset)
    restored = keras_hub.models.CausalLM.from_preset(preset)
    np.testing.assert_array_equal(
        to_numpy(restored.preprocessor(text)[0]["token_ids"]),
        to_numpy(expected["token_ids"]),
    )


@pytest.fixture(scope="module")
def routed():
    x, _ = tm.dense_data(batch=16)
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(model)
    return model, x


def test_routed_merge_needs_calibration_data(routed):
    model, _ = routed
    with pytest.raises(ValueError, match="calibration_data") as info:
        keras_relora.merge_relora(model)
    assert "experts=1" in str(info.value)  # It lists the options.


def test_routed_merge_reports_measured_error(routed, capsys):
    model, x = routed
    merged, error = keras_relora.merge_relora(
        model, x, batch_size=8, return_error=True
    )
    assert_plain(merged)
    assert "output error on 16 calibration samples" in capsys.readouterr().out
    live, plain = to_numpy(model(x)), to_numpy(merged(x))
    np.testing.assert_allclose(
        error["max_abs"], np.abs(plain - live).max(), rtol=1e-4
    )
    np.testing.assert_allclose(
        error["relative"],
        np.linalg.norm(plain - live) / np.linalg.norm(live),
        rtol=1e-4,
    )
    assert error["max_abs"] > 0  # Mean gates are not the per-token gates.
    # Iterables of (x, y) batches work too.
    batches = [(x[:8], None), (x[8:], None)]
    _, again = keras_relora.merge_relora(
        model, batches, verbose=False, return_error=True
    )
    np.testing.assert_allclose(again["relative"], error["relative"], rtol=1e-5)


def test_routed_merge_is_exact_when_experts_agree():
    # With equal experts, any gates (summing to 1) give the same delta:
    # an independent check of the mean-gate formula.
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2, top_k=1)
    tm.randomize_adapters(model)
    for adapter in keras_relora.get_state(model).adapters.values():
        b = to_numpy(adapter.b_kernel)
        adapter.b_kernel.assign(np.repeat(b[:1], 2, axis=0))
    merged = keras_relora.merge_relora(model, x, verbose=False)
    np.testing.assert_allclose(
        to_numpy(merged(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )


def test_merge_refuses_nan_and_quantized_bases():
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=1)
    adapter = keras_relora.get_state(model).adapters["hidden_2"]
    b = to_numpy(adapter.b_kernel)
    b[0, 0, 0] = np.inf
    adapter.b_kernel.assign(b)
    with pytest.raises(ValueError, match="NaN or Inf.*hidden_2|hidden_2.*Inf"):
        keras_relora.merge_relora(model)

    quantized = tm.functional_model()
    quantized(x)
    quantized.quantize("int8")
    quantized.enable_relora(rank=2, experts=1)
    with pytest.raises(ValueError, match="quantize\\('int8'\\)"):
        keras_relora.merge_relora(quantized)


def test_unload_restores_the_base():
    x = tm.token_batch()
    backbone = tm.llama3_backbone()
    y = to_numpy(backbone(x))
    trainable = len(backbone.trainable_weights)
    backbone.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(backbone)
    assert np.abs(to_numpy(backbone(x)) - y).max() > 1e-2
    assert keras_relora.unload(backbone) is backbone
    assert_plain(backbone)
    assert type(backbone) is keras_hub.models.Llama3Backbone
    assert len(backbone.trainable_weights) == trainable
    np.testing.assert_array_equal(to_numpy(backbone(x)), y)
    if keras.config.backend() == "torch":
        assert len(list(backbone.parameters())) == len(backbone.variables)
    # It can be adapted again, with other settings.
    backbone.enable_relora(rank=1, experts=1, targets=["q"])
    assert len(keras_relora.get_state(backbone).adapters) == 2
