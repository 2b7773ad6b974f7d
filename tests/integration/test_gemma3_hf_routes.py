"""Gemma 3 through the Hugging Face routes, on tiny random configs.

Three routes, each checked against `transformers`/`peft` logits:
`save_peft` -> `peft.PeftModel.from_pretrained`; a folder written by
`peft` -> `load_peft`; `merge_relora(...).export_to_transformers` ->
`AutoModelForCausalLM`. The tiny model keeps what sets Gemma 3 apart:
tied embeddings, the embedding scale `sqrt(hidden_dim)`, query/key RMS
norms and the four block norms (all with random, non-zero scales), five
sliding-window blocks then a global one (window shorter than the input),
and, in one config, final logit soft-capping. (Attention soft-capping is
left out: transformers' Gemma 3 ignores `attn_logit_softcapping`, and
Gemma 3's checkpoints use neither cap.)

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
keras_hub = pytest.importorskip("keras_hub")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

VOCAB = 64
SEQ = 10
ROLES = ["q", "k", "v", "o", "gate", "up", "down"]
MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
# Small enough to bind on this model's logits.
SOFT_CAPS = {"final_logit_soft_cap": 2.0}
# The tolerance of every logit comparison (logits are O(1) here and the
# adapters move them by more than 0.1; both sides compute in float32, and
# the largest difference seen was 3.3e-5).
ATOL = 1e-4


def _causal_lm(soft_caps=False, seed=0):
    return tm.gemma3_causal_lm(seed=seed, **(SOFT_CAPS if soft_caps else {}))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((3, SEQ), "int32")
    mask[2, 7:] = 0  # One padded row.
    return {
        "token_ids": rng.integers(1, VOCAB, (3, SEQ)).astype("int32") * mask,
        "padding_mask": mask,
    }


def _export(lm, folder):
    """`export_to_transformers`, with the final soft cap in `config.json`.

    keras-hub 0.32's Gemma 3 exporter leaves `final_logit_softcapping` out
    of `config.json` (it writes it to `generation_config.json` only), so
    transformers would build the model without it: it is written here
    from the backbone's config (Gemma 3 270M has no cap).
    """
    lm.export_to_transformers(str(folder))
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.setdefault(
        "final_logit_softcapping", lm.backbone.final_logit_soft_cap
    )
    with open(path, "w") as f:
        json.dump(config, f)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32
    )
    return model.eval()


def _hf_logits(model, x):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(x["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(x["padding_mask"], dtype=torch.long),
        )
    return _valid(out.logits.numpy(), x)


def _keras_logits(lm, x):
    logits = np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)))
    return _valid(logits, x)


def _valid(logits, x):
    """Logits at the positions that are not padding (as a flat array)."""
    return logits[np.asarray(x["padding_mask"], bool)]


def _randomize_b(model, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    for adapter in keras_relora.get_state(model).adapters.values():
        for variable in adapter.weights:
            if "b_kernel" in variable.path or "router" in variable.path:
                variable.assign(
                    rng.normal(0, scale, variable.shape).astype("float32")
                )


@pytest.mark.parametrize("soft_caps", [False, True])
def test_exported_base_keeps_gemma3_specifics(tmp_path, soft_caps):
    lm = _causal_lm(soft_caps)
    x = _batch()
    hf = _export(lm, tmp_path / "base")
    config = hf.config
    assert config.tie_word_embeddings is True
    assert hf.lm_head.weight.data_ptr() == (
        hf.model.embed_tokens.weight.data_ptr()
    )
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.sliding_window == 4 < SEQ
    assert config.query_pre_attn_scalar == 4
    np.testing.assert_allclose(
        float(hf.model.embed_tokens.embed_scale), np.sqrt(8.0), rtol=1e-6
    )
    np.testing.assert_array_equal(
        hf.model.layers[0].self_attn.q_norm.weight.detach().numpy(),
        keras.ops.convert_to_numpy(
            lm.backbone.get_layer("decoder_block_0").attention.query_norm.scale
        ),
    )
    keras_logits = _keras_logits(lm, x)
    np.testing.assert_allclose(_hf_logits(hf, x), keras_logits, atol=ATOL)
    if soft_caps:
        assert config.final_logit_softcapping == 2.0
        assert np.abs(keras_logits).max() < 2.0
        # The caps bind: the same weights without them give other logits.
        uncapped = keras_hub.models.Gemma3CausalLM(
            backbone=keras_hub.models.Gemma3Backbone.from_config(
                {
                    **lm.backbone.get_config(),
                    "final_logit_soft_cap": None,
                }
            ),
            preprocessor=None,
        )
        uncapped.set_weights(lm.get_weights())
        assert np.abs(_keras_logits(uncapped, x) - keras_logits).max() > 0.1


@pytest.mark.parametrize(
    "variant,soft_caps",
    [("lora", False), ("sharelora", False), ("lora", True)],
)
def test_save_peft_loads_in_peft_with_equal_logits(
    tmp_path, variant, soft_caps
):
    lm = _causal_lm(soft_caps)
    x = _batch()
    hf = _export(lm, tmp_path / "base")
    base = _keras_logits(lm, x)
    lm.enable_relora(rank=2, targets=ROLES, **keras_relora.VARIANTS[variant])
    _randomize_b(lm)
    adapted = _keras_logits(lm, x)
    assert np.abs(adapted - base).max() > 0.1
    keras_relora.save_peft(lm, tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_modules"]) == sorted(MODULES)
    served = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    np.testing.assert_allclose(_hf_logits(served.eval(), x), adapted, atol=ATOL)


def _peft_folder(hf, folder, seed=1):
    """A LoRA folder written by `peft` itself, with random `lora_B`."""
    made = peft.get_peft_model(
        hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=MODULES)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_B" in name:
                parameter.copy_(
                    0.5 * torch.randn(parameter.shape, generator=generator)
                )
    made.save_pretrained(str(folder))
    return made.eval()


@pytest.mark.parametrize("soft_caps", [False, True])
def test_peft_folder_loads_with_load_peft(tmp_path, soft_caps):
    x = _batch()
    source = _causal_lm(soft_caps)
    hf = _export(source, tmp_path / "base")
    base = _hf_logits(hf, x)
    made = _peft_folder(hf, tmp_path / "adapter")
    reference = _hf_logits(made, x)
    assert np.abs(reference - base).max() > 0.1
    lm = _causal_lm(soft_caps)
    lm.set_weights(source.get_weights())  # The same base, fresh.
    keras_relora.load_peft(lm, tmp_path / "adapter")
    state = keras_relora.get_state(lm)
    assert state.settings["rank"] == 2 and len(state.adapters) == 6 * 7
    np.testing.assert_allclose(_keras_logits(lm, x), reference, atol=ATOL)


def _unchanged_paths(lm):
    """Base variables that a merge must copy bitwise: all but kernels."""
    return {
        v.path: keras.ops.convert_to_numpy(v)
        for v in lm.backbone.weights
        if not v.path.endswith("/kernel")
    }


@pytest.mark.parametrize(
    "experts,soft_caps", [(1, False), (4, False), (1, True)]
)
def test_merged_export_loads_in_transformers(
    tmp_path, capsys, experts, soft_caps
):
    lm = _causal_lm(soft_caps)
    x = _batch()
    base = _keras_logits(lm, x)
    before = _unchanged_paths(lm)
    lm.enable_relora(rank=2, experts=experts, targets=ROLES)
    _randomize_b(lm)
    live = _keras_logits(lm, x)
    assert np.abs(live - base).max() > 0.1
    merged, error = keras_relora.merge_relora(
        lm, x if experts > 1 else None, return_error=True
    )
    assert keras_relora.get_state(merged) is None
    assert type(merged) is keras_hub.models.Gemma3CausalLM
    config = merged.backbone.get_config()
    for key, value in lm.backbone.get_config().items():
        assert config[key] == value, key
    assert merged.backbone.token_embedding.tie_weights
    after = _unchanged_paths(merged)
    assert sorted(after) == sorted(before)
    for path, value in before.items():  # norms and embeddings, bitwise
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    merged_logits = _keras_logits(merged, x)
    if experts == 1:
        assert error is None
        np.testing.assert_allclose(merged_logits, live, atol=ATOL)
    else:
        # Mean gates: measured, printed and returned, not exact.
        assert "merge_relora (mean gates): output error" in (
            capsys.readouterr().out
        )
        full = [
            np.asarray(keras.ops.convert_to_numpy(m(x)), "float64")
            for m in (lm, merged)
        ]
        assert error["samples"] == 3
        np.testing.assert_allclose(
            error["max_abs"], np.abs(full[1] - full[0]).max(), rtol=1e-5
        )
        np.testing.assert_allclose(
            error["relative"],
            np.linalg.norm(full[1] - full[0]) / np.linalg.norm(full[0]),
            rtol=1e-4,
        )
    hf = _export(merged, tmp_path / "merged")
    np.testing.assert_allclose(_hf_logits(hf, x), merged_logits, atol=ATOL)
