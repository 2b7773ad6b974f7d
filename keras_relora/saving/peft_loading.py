"""`load_peft`: a Hugging Face PEFT LoRA folder into a keras-hub model.

The folder format, the module names and the `A`/`B` layouts are
`peft_format`'s.
"""

import json
import math
import numbers
import os
import re

import numpy as np

from keras_relora.adapt import named_adapters
from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.enable_relora import enable_relora
from keras_relora.adapt.enable_relora import remove_added
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import get_state
from keras_relora.layers.relora_dense import ReloraDense
from keras_relora.saving import peft_format
from keras_relora.saving.model_saving import exact_targets
from keras_relora.saving.peft_format import A_SUFFIX
from keras_relora.saving.peft_format import B_SUFFIX
from keras_relora.saving.peft_format import CONFIG_NAME
from keras_relora.saving.peft_format import PREFIX
from keras_relora.saving.peft_format import WEIGHTS_NAME


def load_peft(model, folder, *, adapter_name=None):
    """Loads a Hugging Face PEFT LoRA folder into a keras-hub model.

    The other way of `save_peft`: a folder written by `save_peft` or by
    `peft` itself (`get_peft_model(hf_model, LoraConfig(...))
    .save_pretrained(folder)`) for the transformers form of the same base.
    Into a model without adapters, the `lora` variant (`experts=1`,
    `share_a="layer"`) is enabled with the folder's rank, alpha, dropout
    and exactly its modules, then loaded. Into an adapted model, its
    settings must match: `experts=1`, the same rank, scale and adapted
    modules, and with `share_a="role"` every layer of a group must have
    the same `A` in the folder (a folder written by `save_peft` of that
    model does). Everything is checked before anything changes: on any
    difference, or a PEFT feature with no equivalent here (DoRA, biases,
    per-module ranks, `modules_to_save`, embedding adapters), a
    `ValueError` lists it and `model` is left as it was.

    Named adapters (as PEFT's `load_adapter(folder, adapter_name)`): with
    `adapter_name`, the folder loads into the model's adapter of that
    name, or, if the model has none, into a new adapter of that name (the
    active adapter stays active). The folder is `folder/<adapter_name>/`
    when that holds a PEFT config (PEFT's layout for several adapters,
    which `save_peft` writes), else `folder`. Without, it loads into the
    active adapter, or enables "default" on a model without adapters.

    Args:
        model: A keras-hub Llama 3, Mistral, Qwen, Gemma or Gemma 3
            backbone or CausalLM, built, with or without ReLoRA adapters.
        folder: str or `os.PathLike`. Holds `adapter_config.json` and
            `adapter_model.safetensors`.
        adapter_name: str or None. The named adapter to load into (an
            existing one) or to add (a new name). Defaults to `None`.

    Returns:
        `model`.

    Example:

    ```python
    lm = keras_hub.models.Llama3CausalLM.from_preset(path)
    keras_relora.load_peft(lm, "adapter")   # enables `lora`, loads
    keras_relora.load_peft(lm, "adapter", adapter_name="qv")  # adds "qv"
    ```
    """
    if adapter_name is not None:
        named_adapters.check_adapter_name(adapter_name)
    folder = peft_format.adapter_folder(folder, adapter_name)
    state = get_state(model)
    if state is not None and adapter_name not in (None, *state.named):
        return _load(model, folder, adapter_name)
    if state is None:
        return _load(model, folder, adapter_name or "default")
    with named_adapters.activated(state, adapter_name):
        return _load(model, folder, None)


def _load(model, folder, new_name):
    """Loads into the active adapter, or into a new one `new_name`."""
    config, tensors = _read(folder)
    rank, alpha, dropout = _lora_settings(config, folder)
    modules = peft_format.hf_modules(model)
    weights, problems = _pairs(tensors, modules)
    names = {
        k[len(PREFIX) : -len(A_SUFFIX)]
        for k in tensors
        if k.startswith(PREFIX) and k.endswith((A_SUFFIX, B_SUFFIX))
    }
    problems += _target_problems(config, folder, names)
    for name, (a, b) in weights.items():
        axes = ReloraDense.axes_of(modules[name])
        if a.shape != (rank, axes.d_in) or b.shape != (axes.d_out, rank):
            problems.append(
                f"{name}: lora_A {a.shape}, lora_B {b.shape}; the model "
                f"needs {(rank, axes.d_in)} and {(axes.d_out, rank)}"
            )
    state = None if new_name else get_state(model)
    if state is not None and not problems:
        problems += _differences(state, modules, weights, rank, alpha)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"Cannot load the PEFT adapter into model {model.name!r}; "
            f"nothing was loaded. Differences:\n{lines}\nReceived: "
            f"folder={folder!r}"
        )
    if state is not None:
        _assign(state, modules, weights)
        return model
    paths = {
        id(layer): path
        for path, (layer, _) in targets_lib.candidates(
            adapted_model(model)
        ).items()
    }
    targets = exact_targets(paths[id(modules[name])] for name in weights)
    enable_relora(
        model,
        rank,
        1,
        alpha=alpha,
        share_a="layer",
        dropout=dropout,
        targets=targets,
        adapter_name=new_name,
    )
    state = get_state(model)
    try:
        with named_adapters.activated(state, new_name):
            _assign(state, modules, weights)
    except BaseException:
        remove_added(model, state, new_name)
        raise
    return model


def _read(folder):
    paths = [os.path.join(folder, n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"`folder` must be a PEFT adapter folder with {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}; missing: {missing}. Received: folder={folder!r}"
        )
    return _read_config(paths[0]), _read_weights(paths[1])


def _invalid(path, reason):
    return ValueError(
        f"{path!r} is not a valid PEFT adapter file: {reason}. Write the "
        "folder again with `peft`'s `save_pretrained` or "
        "`keras_relora.save_peft`; nothing was loaded."
    )


def _read_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(path, f"it is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise _invalid(
            path, f"it holds a JSON {type(config).__name__}, not an object"
        )
    return config


def _read_weights(path):
    """`{key: float32 array}`, read through `safetensors.safe_open`, which
    checks the header (its length, JSON, dtypes, offsets) against the file.
    """
    peft_format.safetensors_numpy()  # A clear ImportError if missing.
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
            if "BF16" not in dtypes.values():
                tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # SafetensorError is not importable alone.
        raise _invalid(
            path, f"safetensors could not read it ({error})"
        ) from None
    if "BF16" in dtypes.values():
        import safetensors.torch  # numpy has no bfloat16.

        tensors = {
            k: v.float().numpy()
            for k, v in safetensors.torch.load_file(path).items()
        }
    unusable = sorted(
        f"{k} ({dtypes[k]})"
        for k in dtypes
        if dtypes[k] not in ("F16", "BF16", "F32", "F64")
    )
    if unusable:
        raise _invalid(path, f"tensors {unusable} are not floating point")
    return {k: np.asarray(v, "float32") for k, v in tensors.items()}


# `init_lora_weights` values that only initialise A and B. The others
# (PiSSA, OLoRA, CorDA, EVA, LoftQ, ...) make PEFT rebuild a residual base
# when it loads the folder, so the adapter belongs to another base.
_PLAIN_INITS = (True, False, "gaussian")


def _lora_settings(config, folder):
    """`(rank, alpha, dropout)` with `alpha / rank` PEFT's scale."""
    path = os.path.join(folder, CONFIG_NAME)
    unsupported = [
        f"{key}={config.get(key)!r}"
        for key in (
            "use_dora",
            "lora_bias",
            "fan_in_fan_out",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "target_parameters",
            "layer_replication",
            "trainable_token_indices",
        )
        if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("peft_type") != "LORA" or unsupported:
        raise ValueError(
            "`load_peft` reads plain LoRA folders (`peft_type: LORA`, no "
            "DoRA, biases, per-module ranks or alphas, `modules_to_save`): "
            "found peft_type="
            f"{config.get('peft_type')!r} {' '.join(unsupported)}. Merge "
            "such an adapter with `peft` (`merge_and_unload()`) and load "
            f"the merged weights instead. Received: folder={folder!r}"
        )
    init = config.get("init_lora_weights", True)
    if init is not None and init not in _PLAIN_INITS:
        raise ValueError(
            f"{path!r}: `init_lora_weights={init!r}` makes PEFT replace the "
            "base weights by a residual (PiSSA, OLoRA, CorDA, EVA, LoftQ) "
            "when it loads the folder, so the adapter does not apply to the "
            "plain base model. Convert it to a plain LoRA adapter with "
            "`peft` first (`save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)`), or merge it "
            "(`merge_and_unload()`) and load the merged weights."
        )
    if config.get("alora_invocation_tokens"):
        raise ValueError(
            f"{path!r}: `alora_invocation_tokens` is set (an activated "
            "LoRA, which applies only to the tokens after an invocation "
            "sequence); keras_relora adapters apply to every token. Train "
            "or convert a plain LoRA adapter (no `alora_invocation_tokens`)."
        )
    rank = config.get("r")
    if (
        not isinstance(rank, numbers.Integral)
        or isinstance(rank, bool)
        or rank < 1
    ):
        raise _invalid(path, f"`r` must be a positive int, found r={rank!r}")
    alpha = config.get("lora_alpha")
    if (
        not isinstance(alpha, numbers.Real)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise _invalid(
            path,
            f"`lora_alpha` must be a positive number, found "
            f"lora_alpha={alpha!r}",
        )
    dropout = config.get("lora_dropout") or 0.0
    if (
        not isinstance(dropout, numbers.Real)
        or isinstance(dropout, bool)
        or not 0.0 <= dropout < 1.0
    ):
        raise _invalid(
            path,
            f"`lora_dropout` must be a number in [0, 1), found "
            f"lora_dropout={config.get('lora_dropout')!r}",
        )
    if not isinstance(config.get("use_rslora", False), (bool, type(None))):
        raise _invalid(
            path,
            "`use_rslora` must be true or false, found "
            f"use_rslora={config.get('use_rslora')!r}",
        )
    _target_modules(config, path)
    rank, alpha = int(rank), float(alpha)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # alpha / sqrt(r) == this / r.
    return rank, alpha, float(dropout)


def _target_modules(config, path):
    """The config's `target_modules`: None, a regex or a list of names."""
    targets = config.get("target_modules")
    if targets is None or isinstance(targets, str):
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as error:
                raise _invalid(
                    path, f"`target_modules` is not a regex ({error})"
                ) from None
        return targets
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return targets
    raise _invalid(
        path,
        "`target_modules` must be a list of module names or a regex, "
        f"found target_modules={targets!r}",
    )


def _target_problems(config, folder, names):
    """What the config's `target_modules` and the file's modules disagree
    on, as PEFT matches them (a regex: the full module name; a list: the
    name or its last components)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        pattern = re.compile(targets)
        outside = sorted(n for n in names if not pattern.fullmatch(n))
        unused = [] if len(outside) < len(names) else [targets]
    else:

        def matches(name, target):
            return name == target or name.endswith("." + target)

        outside = sorted(
            n for n in names if not any(matches(n, t) for t in targets)
        )
        unused = sorted(
            t for t in targets if not any(matches(n, t) for n in names)
        )
    problems = []
    weights = os.path.join(folder, WEIGHTS_NAME)
    config_path = os.path.join(folder, CONFIG_NAME)
    if outside:
        problems.append(
            f"modules with tensors in {weights!r} that `target_modules` "
            f"{targets!r} of {config_path!r} does not match: {outside}"
        )
    if unused:
        problems.append(
            f"`target_modules` entries of {config_path!r} with no tensor in "
            f"{weights!r}: {unused}"
        )
    return problems


def _pairs(tensors, modules):
    """`({module: (lora_A, lora_B)}, problems)` of the folder's tensors."""
    found, problems = {}, []
    for key in sorted(tensors):
        suffix = key.endswith((A_SUFFIX, B_SUFFIX))
        if not (key.startswith(PREFIX) and suffix):
            problems.append(f"tensor {key!r} is not a LoRA A or B weight")
            continue
        name = key[len(PREFIX) : -len(A_SUFFIX)]
        if name not in modules:
            problems.append(f"module {name!r} is not in the model")
            continue
        pair = found.setdefault(name, [None, None])
        pair[key.endswith(B_SUFFIX)] = tensors[key]
    for name, (a, b) in found.items():
        if a is None or b is None:
            problems.append(f"{name}: lora_A or lora_B missing")
    if not found and not problems:
        problems.append("no LoRA weight in the folder")
    return {n: tuple(p) for n, p in found.items()}, problems


def _differences(state, modules, weights, rank, alpha):
    settings = state.settings
    problems = []
    if settings["experts"] != 1:
        problems.append(
            f"experts: folder 1 (PEFT LoRA), model {settings['experts']}"
        )
    if settings["rank"] != rank:
        problems.append(f"rank: folder {rank}, model {settings['rank']}")
    by_layer = {id(a._base_layer): a for a in state.adapters.values()}
    alphas = {float(a.alpha) for a in state.adapters.values()}
    if any(abs(a - alpha) > 1e-6 * abs(alpha) for a in alphas):
        problems.append(f"alpha: folder {alpha}, model {sorted(alphas)}")
    adapted = {
        name
        for name, layer in modules.items()
        if id(layer) in by_layer and not by_layer[id(layer)].pruned
    }
    if adapted != set(weights):
        problems.append(
            f"modules in the folder, not adapted: "
            f"{sorted(set(weights) - adapted)}; adapted, not in the "
            f"folder: {sorted(adapted - set(weights))}"
        )
    if problems or settings.get("share_a") != "role":
        return problems
    groups = {}
    for name, (a, _) in weights.items():
        adapter = by_layer[id(modules[name])]
        groups.setdefault(id(adapter.shared_a), []).append((name, a))
    for members in groups.values():
        if any(not np.array_equal(a, members[0][1]) for _, a in members):
            problems.append(
                f"share_a='role': the model shares one A by "
                f"{[n for n, _ in members]}, the folder has different ones. "
                "Load into a model without adapters (the `lora` variant)"
            )
    return problems


def _assign(state, modules, weights):
    by_layer = {id(a._base_layer): a for a in state.adapters.values()}
    for name, (a, b) in weights.items():
        adapter = by_layer[id(modules[name])]
        axes = adapter.axes
        adapter.shared_a.kernel.assign(peft_format.a_from_hf(a, axes))
        adapter.b_kernel.assign(peft_format.b_from_hf(b, axes)[None])
