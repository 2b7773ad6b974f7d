"""Hugging Face PEFT LoRA folders: `save_peft` and `load_peft`.

A PEFT LoRA folder is what `peft.PeftModel.from_pretrained` and the
serving engines that take LoRA adapters (vLLM, TGI, SGLang, llama.cpp's
converter) read:

* `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha` (the
  scale is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
  `use_rslora`), `target_modules`, `lora_dropout`, ...;
* `adapter_model.safetensors`: for each adapted module, e.g.
  `model.layers.0.self_attn.q_proj` of a `LlamaForCausalLM`,
  `base_model.model.<module>.lora_A.weight` of shape `(r, d_in)` and
  `base_model.model.<module>.lora_B.weight` of shape `(d_out, r)`, so that
  the module computes `x @ W.T + scale * (x @ A.T) @ B.T`.

The module names are the ones keras-hub's `export_to_transformers` writes
for the same backbone (Llama 3, Mistral, Qwen, Gemma, Gemma 3), and
`d_in`/`d_out` are flattened as that exporter flattens the kernel:
contracted axes, then free axes, each in the kernel's axis order. An
adapter's `A` is `(d_in, rank)` with its axes in the input's order and its
`B` `(experts, rank, d_out)` in the output's order, so both are permuted
into the kernel's order here.

Only single-B adapters have a PEFT form: a routed mixture of experts
(`experts > 1`) mixes its B's with input-dependent gates, which PEFT's
LoRA layer cannot express.
"""

import json
import os
import re

import numpy as np
from keras import ops

from keras_relora import _atomic_writes
from keras_relora.adapt import named_adapters
from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.model_class import base_class
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import require_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"

# Role of a layer in a keras-hub block (`targets.role_of`) -> its module
# in the Hugging Face block, as keras-hub's `export_to_transformers` maps
# them for these backbone classes.
_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
FAMILIES = (
    "Llama3Backbone",
    "MistralBackbone",
    "QwenBackbone",
    "GemmaBackbone",
    "Gemma3Backbone",
)
_BLOCK = re.compile(r"^(?:transformer_layer|decoder_block)_(\d+)/")


def hf_modules(model):
    """`{Hugging Face module name: keras layer}` of a keras-hub LM."""
    backbone = adapted_model(model)
    family = base_class(backbone).__name__
    if family not in FAMILIES:
        raise ValueError(
            "PEFT folders name the Hugging Face modules of the model, which "
            f"keras_relora knows for {list(FAMILIES)} (keras-hub families "
            "with a transformers exporter). For other models, save the "
            "adapters with `model.save_relora_weights(path)`, or merge "
            f"them. Received: model of family {family}"
        )
    found = {}
    for path, (layer, role) in targets_lib.candidates(backbone).items():
        block = _BLOCK.match(targets_lib.relative_path(backbone, path))
        if block and role in _MODULES:
            found[f"model.layers.{block.group(1)}.{_MODULES[role]}"] = layer
    return found


def save_peft(
    model, folder, *, base_model_name_or_path=None, adapter_name=None
):
    """Writes the adapters of `model` as a Hugging Face PEFT LoRA folder.

    The folder (`adapter_config.json`, `adapter_model.safetensors`) loads
    with `peft.PeftModel.from_pretrained(hf_model, folder)` onto the
    `transformers` model that keras-hub's `export_to_transformers` writes
    for the base model, and gives the adapted Keras model's outputs. For
    every single-B configuration: `lora`, `lora_fa`, `sharelora` and
    `relora` with `experts=1` (a shared `A` is written once per layer, as
    PEFT has no sharing). Pruned adapters contribute nothing, so they are
    left out (their modules get no LoRA; `target_modules` then lists full
    module names). Does not change `model`.

    Named adapters are written in PEFT's layout (`save_pretrained` with
    `selected_adapters`): the adapter "default" in `folder` itself, any
    other in `folder/<name>/`. PEFT loads them with
    `PeftModel.from_pretrained(hf_model, folder)` and
    `load_adapter(folder + "/<name>", adapter_name="<name>")`;
    `keras_relora.load_peft(model, folder, adapter_name="<name>")` finds
    the sub-folder. Every adapter written must have a PEFT form: if one
    has not, nothing is written.

    Args:
        model: A keras-hub Llama 3, Mistral, Qwen, Gemma or Gemma 3
            backbone or CausalLM with ReLoRA adapters (`experts=1`).
        folder: str or `os.PathLike`. Created if missing. The folder is
            written whole next to its destination and swapped into place,
            so an interrupted save leaves the previous folder as it was
            (other files in it are kept).
        base_model_name_or_path: str or None. Written to the config for
            tools that load the base by name. Defaults to `None`.
        adapter_name: None, a str or a list of str. The named adapters
            to write. Defaults to `None` (every adapter of the model).

    Example:

    ```python
    lm.enable_relora(rank=16, **keras_relora.VARIANTS["lora"])
    lm.fit(...)
    keras_relora.save_peft(lm, "adapter")
    keras_relora.merge_relora(lm)  # or: lm.export_to_transformers(...)
    ```
    """
    state = require_state(model, "`save_peft`")
    names = _selected(state, adapter_name)
    files = {}
    for name in names:
        with named_adapters.activated(state, name):
            try:
                files[name] = _adapter_files(
                    model, state, base_model_name_or_path
                )
            except ValueError as error:
                if len(state.named) < 2:
                    raise
                raise ValueError(
                    f"Adapter {name!r} cannot be written as PEFT LoRA "
                    f"(nothing was written): {error} To write the others "
                    "alone, pass `adapter_name=[...]`."
                ) from None
    folder = os.fspath(folder)
    # The root first: its sub-folders are written into the swapped folder.
    for name in sorted(files, key=lambda n: n != "default"):
        tensors, config = files[name]
        path = folder if name == "default" else os.path.join(folder, name)
        _write(path, tensors, config)


def adapter_folder(folder, adapter_name):
    """Where `save_peft` wrote adapter `adapter_name` in `folder`: its
    sub-folder if it holds a PEFT config, else `folder` itself."""
    folder = os.fspath(folder)
    if adapter_name is None or adapter_name == "default":
        return folder
    sub = os.path.join(folder, adapter_name)
    if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    return folder


def _selected(state, adapter_name):
    if adapter_name is None:
        return list(state.named)
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    if not isinstance(names, (list, tuple)) or not names:
        raise TypeError(
            "`adapter_name` must be None (every adapter), an adapter name "
            "or a non-empty list of them. "
            f"Received: adapter_name={adapter_name!r}"
        )
    for name in names:
        named_adapters.resolve_name(state, name, "`save_peft`")
    return list(dict.fromkeys(names))


def _adapter_files(model, state, base_model_name_or_path):
    """`(tensors, config)` of the active adapter's PEFT folder."""
    if state.settings["experts"] != 1:
        raise ValueError(
            "`save_peft` writes single-B LoRA adapters; this model has "
            f"routed experts (experts={state.settings['experts']}): each "
            "token mixes its B's with input-dependent gates, which a PEFT "
            "LoRA module cannot express. Serve it merged, "
            "`keras_relora.merge_relora(model, calibration_data)"
            ".export_to_transformers(path)` (the gates are averaged and the "
            "error is measured), or live with `model.export(...)`. "
            f"Received: experts={state.settings['experts']}"
        )
    names = {id(layer): name for name, layer in hf_modules(model).items()}
    outside = [
        p for p, a in state.adapters.items() if id(a._base_layer) not in names
    ]
    if outside:
        raise ValueError(
            f"Adapted layers {outside} have no Hugging Face module that "
            "keras-hub's exporter writes, so PEFT cannot place them. "
            "Enable the adapters on the attention and MLP projections only "
            "(`targets=['q', 'k', 'v', 'o', 'gate', 'up', 'down']`)."
        )
    _refuse_trained_layers(state)
    tensors = {}
    alphas = set()
    for adapter in state.adapters.values():
        if adapter.pruned:
            continue
        name = names[id(adapter._base_layer)]
        a = _numpy(adapter.shared_a.kernel)  # (d_in, rank), input order
        b = _numpy(adapter.b_kernel)[0] * _numpy(adapter.suppression)
        tensors[PREFIX + name + A_SUFFIX] = a_to_hf(a, adapter.axes)
        tensors[PREFIX + name + B_SUFFIX] = b_to_hf(b, adapter.axes)
        alphas.add(float(adapter.alpha))
    if not tensors:
        raise ValueError(
            f"Every adapter of model {model.name!r} is pruned: there is no "
            "LoRA weight to write. The base model alone is the result."
        )
    config = _config(
        state,
        sorted(_module_names(tensors)),
        alphas,
        set(names.values()),
        base_model_name_or_path,
    )
    return tensors, config


def _write(folder, tensors, config):
    with _atomic_writes.atomic_folder(folder) as partial:
        safetensors_numpy().save_file(
            tensors,
            os.path.join(partial, WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        with open(os.path.join(partial, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def _refuse_trained_layers(state):
    trained = getattr(state, "trained", {})
    if trained:
        raise ValueError(
            "`save_peft` writes LoRA weights only, and variables of this "
            f"model train in full ({sorted(trained)}, `train_layers`). Export "
            "the merged model instead: `keras_relora.merge_relora(model)"
            ".export_to_transformers(path)` (it keeps the trained layers), "
            "or enable the adapters with `train_layers=[]`."
        )


def _config(state, modules, alphas, every, base_name):
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    covers_all = set(modules) == {
        m for m in every if m.rsplit(".", 1)[-1] in short
    }
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alphas.pop(),
        "lora_dropout": float(state.settings.get("dropout", 0.0)),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(state.settings["rank"]),
        "rank_pattern": {},
        "target_modules": short if covers_all else modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _module_names(tensors):
    return {
        k[len(PREFIX) : -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX)
    }


def _kernel_order(axes):
    """Permutations of `in_shape`/`out_shape` into the kernel's order."""
    n = len(axes.in_shape)
    return (
        np.argsort(axes.kernel_to_2d[:n]),
        np.argsort(axes.kernel_to_2d[n:]),
    )


def a_to_hf(a, axes):
    """`A` `(d_in, rank)` (input order) -> PEFT `lora_A` `(rank, d_in)`."""
    order, _ = _kernel_order(axes)
    rank = a.shape[-1]
    a = a.reshape(axes.in_shape + (rank,))
    a = np.transpose(a, tuple(order) + (len(order),))
    return np.ascontiguousarray(a.reshape(-1, rank).T)


def b_to_hf(b, axes):
    """`B` `(rank, d_out)` (output order) -> PEFT `lora_B` `(d_out, rank)`."""
    _, order = _kernel_order(axes)
    rank = b.shape[0]
    b = b.reshape((rank,) + axes.out_shape)
    b = np.transpose(b, (0,) + tuple(1 + order))
    return np.ascontiguousarray(b.reshape(rank, -1).T)


def a_from_hf(a, axes):
    """PEFT `lora_A` `(rank, d_in)` -> `A` `(d_in, rank)` (input order)."""
    order, _ = _kernel_order(axes)
    rank = a.shape[0]
    a = a.T.reshape(tuple(axes.in_shape[i] for i in order) + (rank,))
    a = np.transpose(a, tuple(np.argsort(order)) + (len(order),))
    return a.reshape(axes.d_in, rank)


def b_from_hf(b, axes):
    """PEFT `lora_B` `(d_out, rank)` -> `B` `(rank, d_out)` (output order)."""
    _, order = _kernel_order(axes)
    rank = b.shape[1]
    b = b.T.reshape((rank,) + tuple(axes.out_shape[i] for i in order))
    b = np.transpose(b, (0,) + tuple(1 + np.argsort(order)))
    return b.reshape(rank, axes.d_out)


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable), "float32")


def safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "PEFT folders need the `safetensors` package: "
            "`pip install keras-relora[hf]` or `pip install safetensors`."
        ) from None
    return safetensors.numpy
