"""Hugging Face interop: no export drops adapters; merged transformers
folders and PEFT adapter folders load in `transformers`/`peft` with the
Keras model's logits.

`transformers` and `peft` run on torch (CPU) in this process whatever
`KERAS_BACKEND` is; the Keras side runs on the backend under test.
"""

import json
import os

import keras
import numpy as np
import pytest
import tiny_models as tm

import keras_relora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def _causal_lm():
    return tm.llama3_causal_lm(tie_word_embeddings=True)


def _hf_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    )
    return model.eval()


def _hf_logits(hf_model, x):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(x["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(x["padding_mask"], dtype=torch.long),
        )
    return out.logits.numpy()


def _keras_logits(lm, x):
    return np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)))


def _randomize_b(model, seed=0, scale=0.5):
    """Non-zero B (and router) values, so adapters change the outputs."""
    rng = np.random.default_rng(seed)
    state = keras_relora.get_state(model)
    for adapter in state.adapters.values():
        for variable in adapter.weights:
            if "b_kernel" in variable.path or "router" in variable.path:
                variable.assign(
                    rng.normal(0, scale, variable.shape).astype("float32")
                )


# --- 1. No export path drops adapters -----------------------------------


@pytest.mark.parametrize("where", ["task", "task_backbone", "backbone"])
def test_export_to_transformers_refuses_adapted_models(tmp_path, where):
    lm = _causal_lm()
    model = lm.backbone if where == "backbone" else lm
    model.enable_relora(rank=2, experts=1)
    target = lm.backbone if where == "task_backbone" else model
    folder = tmp_path / "hf"
    with pytest.raises(
        ValueError,
        match=r"merge_relora\(model\)\."
        r"export_to_transformers.*save_peft",
    ):
        target.export_to_transformers(str(folder))
    assert not folder.exists()
    # unload gives the exporter back.
    keras_relora.unload(model)
    target.export_to_transformers(str(folder))
    assert (folder / "config.json").exists()


# --- 2. Merged export: a plain transformers folder ----------------------


@pytest.mark.parametrize("experts", [1, 2])
def test_merged_export_loads_in_transformers(tmp_path, capsys, experts):
    lm = _causal_lm()
    lm.enable_relora(rank=2, experts=experts)
    _randomize_b(lm)
    x = tm.token_batch()
    live = _keras_logits(lm, x)
    calibration = x if experts > 1 else None
    merged = keras_relora.merge_relora(lm, calibration)
    if experts > 1:  # The mean-gate error is measured and printed.
        assert "merge_relora (mean gates): output error" in (
            capsys.readouterr().out
        )
    else:
        np.testing.assert_allclose(
            _keras_logits(merged, x), live, atol=1e-5, rtol=1e-5
        )
    merged.export_to_transformers(str(tmp_path / "hf"))
    hf = _hf_model(tmp_path / "hf")
    expected = _keras_logits(merged, x)
    assert np.abs(expected - _keras_logits(_causal_lm(), x)).max() > 1e-3
    np.testing.assert_allclose(_hf_logits(hf, x), expected, atol=1e-4)


# --- 3. PEFT adapter folders --------------------------------------------

ALL_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def _exported_base(lm, folder):
    """keras-hub's own export of the (not yet adapted) base model."""
    lm.export_to_transformers(str(folder))
    return _hf_model(folder)


@pytest.mark.parametrize("variant", ["lora", "lora_fa", "sharelora", "relora"])
def test_save_peft_loads_in_peft_with_equal_logits(tmp_path, variant):
    lm = _causal_lm()
    hf = _exported_base(lm, tmp_path / "base")
    x = tm.token_batch()
    base = _keras_logits(lm, x)
    lm.enable_relora(
        rank=2, alpha=3.0, targets=ALL_ROLES, **keras_relora.VARIANTS[variant]
    )
    _randomize_b(lm)
    adapted = _keras_logits(lm, x)
    assert np.abs(adapted - base).max() > 1e-2
    keras_relora.save_peft(lm, tmp_path / "adapter")
    config = json.loads(
        (tmp_path / "adapter" / "adapter_config.json").read_text()
    )
    assert config["r"] == 2 and config["lora_alpha"] == 3.0
    assert sorted(config["target_modules"]) == sorted(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    np.testing.assert_allclose(_hf_logits(served.eval(), x), adapted, atol=1e-4)


def test_save_peft_leaves_pruned_adapters_out(tmp_path):
    lm = _causal_lm()
    hf = _exported_base(lm, tmp_path / "base")
    lm.enable_relora(rank=2, experts=1)
    _randomize_b(lm)
    state = keras_relora.get_state(lm)
    pruned = [p for p in state.adapters if "query" in p][0]
    state.adapters[pruned].prune()
    x = tm.token_batch()
    adapted = _keras_logits(lm, x)
    keras_relora.save_peft(lm, tmp_path / "adapter")
    config = json.loads(
        (tmp_path / "adapter" / "adapter_config.json").read_text()
    )
    # Full module names: q_proj of block 1 only, not block 0's.
    assert "model.layers.0.self_attn.q_proj" not in config["target_modules"]
    assert "model.layers.1.self_attn.q_proj" in config["target_modules"]
    served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    assert not hasattr(
        served.base_model.model.model.layers[0].self_attn.q_proj, "lora_A"
    )
    np.testing.assert_allclose(_hf_logits(served.eval(), x), adapted, atol=1e-4)


def test_named_adapters_load_in_peft_as_named_adapters(tmp_path):
    lm = _causal_lm()
    hf = _exported_base(lm, tmp_path / "base")
    x = tm.token_batch()
    lm.enable_relora(rank=2, alpha=3.0, targets=ALL_ROLES, experts=1)
    _randomize_b(lm, seed=1)
    lm.enable_relora(
        rank=4,
        experts=1,
        share_a="layer",
        targets=["q", "v"],
        adapter_name="qv",
    )
    keras_relora.set_adapter(lm, "qv")
    _randomize_b(lm, seed=2)
    with_qv = _keras_logits(lm, x)
    keras_relora.set_adapter(lm, "default")
    with_default = _keras_logits(lm, x)
    keras_relora.save_peft(lm, tmp_path / "adapters")
    # PEFT's own layout: "default" at the root, "qv" in its sub-folder.
    served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapters"))
    served.load_adapter(str(tmp_path / "adapters" / "qv"), adapter_name="qv")
    served.eval()
    np.testing.assert_allclose(_hf_logits(served, x), with_default, atol=1e-4)
    served.set_adapter("qv")
    np.testing.assert_allclose(_hf_logits(served, x), with_qv, atol=1e-4)


def test_save_peft_refuses_routed_experts(tmp_path):
    lm = _causal_lm()
    lm.enable_relora(rank=2, experts=2)
    with pytest.raises(
        ValueError,
        match=r"routed experts.*merge_relora"
        r".*Received: experts=2",
    ):
        keras_relora.save_peft(lm, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def _peft_folder(hf, folder, *, use_rslora=False, seed=0):
    """A LoRA folder written by `peft` itself, with non-zero lora_B."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
    )
    model = peft.get_peft_model(hf, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_folder_loads_into_the_lora_variant(tmp_path, use_rslora):
    lm = _causal_lm()
    hf = _exported_base(lm, tmp_path / "base")
    served = _peft_folder(hf, tmp_path / "adapter", use_rslora=use_rslora)
    x = tm.token_batch()
    expected = _hf_logits(served, x)
    assert np.abs(expected - _keras_logits(lm, x)).max() > 1e-2
    keras_relora.load_peft(lm, tmp_path / "adapter")
    state = keras_relora.get_state(lm)
    assert state.settings["experts"] == 1
    assert state.settings["share_a"] == "layer"
    assert len(state.adapters) == 2 * 4
    np.testing.assert_allclose(_keras_logits(lm, x), expected, atol=1e-4)


def test_save_then_load_peft_round_trip_shared_a(tmp_path):
    source, target = _causal_lm(), _causal_lm()
    for s, t in zip(source.weights, target.weights, strict=True):
        t.assign(s)
    source.enable_relora(rank=2, **keras_relora.VARIANTS["sharelora"])
    _randomize_b(source)
    keras_relora.save_peft(source, tmp_path / "adapter")
    x = tm.token_batch()
    target.enable_relora(rank=2, **keras_relora.VARIANTS["sharelora"])
    assert (
        np.abs(_keras_logits(target, x) - _keras_logits(source, x)).max() > 1e-3
    )
    keras_relora.load_peft(target, tmp_path / "adapter")
    np.testing.assert_allclose(
        _keras_logits(target, x), _keras_logits(source, x), atol=1e-5
    )


def test_load_peft_refuses_mismatches_before_changing_anything(tmp_path):
    lm = _causal_lm()
    hf = _exported_base(lm, tmp_path / "base")
    _peft_folder(hf, tmp_path / "adapter")  # r=4, its own A per layer
    # Another rank.
    lm.enable_relora(
        rank=2, experts=1, share_a="layer", targets=["q", "v", "o", "down"]
    )
    before = tm.snapshot(lm)
    with pytest.raises(ValueError, match=r"rank: folder 4, model 2"):
        keras_relora.load_peft(lm, tmp_path / "adapter")
    tm.assert_unchanged(lm, before)
    # A shared A cannot hold a different A per layer.
    keras_relora.unload(lm)
    lm.enable_relora(
        rank=4,
        alpha=8,
        experts=1,
        share_a="role",
        targets=["q", "v", "o", "down"],
    )
    before = tm.snapshot(lm)
    with pytest.raises(ValueError, match=r"share_a='role'.*different"):
        keras_relora.load_peft(lm, tmp_path / "adapter")
    tm.assert_unchanged(lm, before)
    # Other modules adapted.
    keras_relora.unload(lm)
    lm.enable_relora(
        rank=4, alpha=8, experts=1, share_a="layer", targets=["q", "v"]
    )
    with pytest.raises(
        ValueError,
        match=r"adapted, not in the folder: \[\]"
        r"|modules in the folder, not adapted",
    ):
        keras_relora.load_peft(lm, tmp_path / "adapter")
    # A plain model of another size: nothing enabled.
    small = tm.llama3_causal_lm(num_layers=1, tie_word_embeddings=True)
    with pytest.raises(
        ValueError,
        match=r"model.layers.1.* is not in the "
        r"model",
    ):
        keras_relora.load_peft(small, tmp_path / "adapter")
    assert keras_relora.get_state(small) is None
    # PEFT features with no equivalent.
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"plain LoRA.*use_dora=True"):
        keras_relora.load_peft(small, tmp_path / "adapter")


def test_save_peft_gemma_loads_in_peft(tmp_path):
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tm.VOCAB,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    )
    lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    hf = _exported_base(lm, tmp_path / "base")
    x = tm.token_batch()
    np.testing.assert_allclose(
        _hf_logits(hf, x), _keras_logits(lm, x), atol=1e-4
    )
    lm.enable_relora(
        rank=2, targets=ALL_ROLES, **keras_relora.VARIANTS["sharelora"]
    )
    _randomize_b(lm)
    keras_relora.save_peft(lm, tmp_path / "adapter")
    served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    np.testing.assert_allclose(
        _hf_logits(served.eval(), x), _keras_logits(lm, x), atol=1e-4
    )


def test_save_peft_refuses_what_peft_cannot_hold(tmp_path):
    # Layers trained in full (`train_layers`) are not LoRA weights.
    lm = _causal_lm()
    lm.enable_relora(
        rank=2, experts=1, train_layers=["sequence_output_layernorm"]
    )
    with pytest.raises(ValueError, match=r"train in full.*merge_relora"):
        keras_relora.save_peft(lm, tmp_path / "adapter")
    # A family without a transformers exporter has no module names.
    import keras_hub

    encoder = keras_hub.models.BertBackbone(
        vocabulary_size=tm.VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    encoder.enable_relora(rank=2, experts=1)
    with pytest.raises(
        ValueError,
        match=r"Received: model of family "
        r"BertBackbone",
    ):
        keras_relora.save_peft(encoder, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_peft_round_trip_on_a_quantized_base(tmp_path, mode):
    source, target = _causal_lm(), _causal_lm()
    for s, t in zip(source.weights, target.weights, strict=True):
        t.assign(s)
    tm.quantize(source, mode)
    tm.quantize(target, mode)
    source.enable_relora(rank=2, **keras_relora.VARIANTS["lora"])
    _randomize_b(source)
    keras_relora.save_peft(source, tmp_path / "adapter")
    config = json.loads(
        (tmp_path / "adapter" / "adapter_config.json").read_text()
    )
    assert config["peft_type"] == "LORA" and config["r"] == 2
    x = tm.token_batch()
    target.enable_relora(rank=2, **keras_relora.VARIANTS["lora"])
    keras_relora.load_peft(target, tmp_path / "adapter")
    np.testing.assert_array_equal(
        _keras_logits(target, x), _keras_logits(source, x)
    )
