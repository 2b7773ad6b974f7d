"""Gemma 3 270M through the Hugging Face routes, on the real weights.

1. keras-hub vs transformers logits of the same base weights (the folder
   that `relora_offline.gemma3.convert_gemma3` writes);
2. `keras_relora.save_peft` of a rank-8 `lora` adapter (random `B`) on all
   seven projections, loaded by `peft.PeftModel.from_pretrained` on
   transformers, vs the Keras model;
3. a folder written by `peft.get_peft_model(...).save_pretrained` (random
   `lora_B`) loaded by `keras_relora.load_peft` into the Keras model;
4. ReLoRA's default (`enable_relora(rank=8, experts=4)`: q, k, v, up, down,
   random `B` and routers) merged with `keras_relora.merge_relora` (mean
   gates over calibration text, error measured), exported with
   `export_to_transformers` and read by `AutoModelForCausalLM`, vs the
   merged Keras model.

Each route also checks what sets Gemma 3 apart: the head stays tied to the
embedding (transformers' `lm_head` is `embed_tokens`, the exported
safetensors hold no `lm_head.weight`), the embedding scale `sqrt(640)`,
the query/key norms and block norms (copied bitwise by the merge, equal
in the export), the sliding/global block pattern and the final logit
soft cap (none in Gemma 3 270M, on both sides).

Prints the largest absolute logit differences on the tokens that are not
padding, relative to the largest logit (not a timing).

    KERAS_BACKEND=torch OMP_NUM_THREADS=2 \
        .venv/bin/python benchmarks/hf_routes_gemma3.py
"""

import argparse
import json
import os
import tempfile
import time

import keras
import numpy as np
import peft
import torch
import transformers

import keras_relora
from relora_offline import gemma3

MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars "
    "in Paris, France. It is named after the engineer Gustave Eiffel.",
    "Question: Which gas do plants take in for photosynthesis?\nAnswer:",
]


def _batch(tokenizer):
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), "int32")
    mask = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"token_ids": ids, "padding_mask": mask}


def _hf_logits(model, x):
    with torch.no_grad():
        logits = model(
            input_ids=torch.as_tensor(x["token_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(x["padding_mask"], dtype=torch.long),
        ).logits
    return logits.float().numpy()[x["padding_mask"].astype(bool)]


def _keras_logits(lm, x):
    logits = keras.ops.convert_to_numpy(lm(x, training=False))
    return np.asarray(logits, "float32")[x["padding_mask"].astype(bool)]


def _report(name, actual, expected, moved=None):
    diff = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    line = (
        f"{name}: max |diff| {diff:.3g} (relative {diff / scale:.3g}; "
        f"logits up to {scale:.3g})"
    )
    if moved is not None:
        line += f"; the adapters moved the logits by {moved:.3g}"
    print(line, flush=True)
    return {"max_abs": diff, "relative": diff / scale, "moved": moved}


def _randomize(lm, seed, scale):
    rng = np.random.default_rng(seed)
    for adapter in keras_relora.get_state(lm).adapters.values():
        for variable in adapter.weights:
            if "b_kernel" in variable.path or "router" in variable.path:
                variable.assign(
                    rng.normal(0, scale, variable.shape).astype("float32")
                )


def _hf_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    )
    return model.eval()


def _check_hf_specifics(model, lm):
    """Gemma 3's specifics in a transformers model vs the Keras one."""
    config = model.config
    backbone = lm.backbone
    assert config.tie_word_embeddings, "untied head"
    assert (
        model.lm_head.weight.data_ptr()
        == model.model.embed_tokens.weight.data_ptr()
    ), "lm_head is not embed_tokens"
    scale = float(model.model.embed_tokens.embed_scale)
    assert abs(scale - np.sqrt(backbone.hidden_dim)) < 1e-4, scale
    sliding = [
        backbone.get_layer(f"decoder_block_{i}").use_sliding_window_attention
        for i in range(backbone.num_layers)
    ]
    assert config.layer_types == [
        "sliding_attention" if s else "full_attention" for s in sliding
    ], config.layer_types
    assert config.final_logit_softcapping == backbone.final_logit_soft_cap
    for i in (0, backbone.num_layers - 1):
        block = backbone.get_layer(f"decoder_block_{i}")
        layer = model.model.layers[i]
        pairs = [
            (layer.self_attn.q_norm, block.attention.query_norm),
            (layer.self_attn.k_norm, block.attention.key_norm),
            (layer.input_layernorm, block.pre_attention_norm),
            (layer.post_feedforward_layernorm, block.post_ffw_norm),
        ]
        for theirs, ours in pairs:
            np.testing.assert_array_equal(
                theirs.weight.detach().numpy(),
                keras.ops.convert_to_numpy(ours.scale),
            )
    return "tied head, embed_scale, norms, layer types, soft cap: equal"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    results = {"backend": keras.backend.backend()}
    folder = gemma3.convert_gemma3()
    lm = gemma3.load_gemma3(dtype="float32")
    hf = _hf_model(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    x = _batch(tokenizer)
    print(f"{x['padding_mask'].sum()} tokens in {len(TEXTS)} rows (one padded)")
    print(_check_hf_specifics(hf, lm))
    base_k, base_h = _keras_logits(lm, x), _hf_logits(hf, x)
    results["base"] = _report("base, keras-hub vs transformers", base_k, base_h)
    tmp = tempfile.mkdtemp()

    # 2. save_peft -> PeftModel.
    lm.enable_relora(
        rank=8,
        targets=["q", "k", "v", "o", "gate", "up", "down"],
        **keras_relora.VARIANTS["lora"],
    )
    _randomize(lm, seed=0, scale=0.01)
    adapted_k = _keras_logits(lm, x)
    keras_relora.save_peft(lm, f"{tmp}/ours")
    served = peft.PeftModel.from_pretrained(hf, f"{tmp}/ours").eval()
    results["save_peft"] = _report(
        "save_peft -> PeftModel",
        _hf_logits(served, x),
        adapted_k,
        float(np.abs(adapted_k - base_k).max()),
    )
    del served
    keras_relora.unload(lm)
    np.testing.assert_array_equal(_keras_logits(lm, x), base_k)

    # 3. A folder written by peft -> load_peft.
    hf2 = _hf_model(folder)
    made = peft.get_peft_model(
        hf2, peft.LoraConfig(r=8, lora_alpha=16, target_modules=MODULES)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_B" in name:
                parameter.copy_(
                    0.01 * torch.randn(parameter.shape, generator=generator)
                )
    made.save_pretrained(f"{tmp}/theirs")
    reference = _hf_logits(made.eval(), x)
    del made, hf2
    keras_relora.load_peft(lm, f"{tmp}/theirs")
    results["load_peft"] = _report(
        "peft's folder -> load_peft",
        _keras_logits(lm, x),
        reference,
        float(np.abs(reference - base_h).max()),
    )
    keras_relora.unload(lm)

    # 4. merge_relora -> export_to_transformers -> AutoModelForCausalLM.
    # The base's variables other than kernels (embedding, norms), before
    # the adapters add theirs.
    norms_before = {
        v.path: keras.ops.convert_to_numpy(v)
        for v in lm.backbone.weights
        if not v.path.endswith("/kernel")
    }
    lm.enable_relora(rank=8, experts=4)
    state = keras_relora.get_state(lm)
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_weights)
    total = lm.count_params()
    print(
        f"enable_relora(rank=8, experts=4): {len(state.adapters)} layers "
        f"(block 0: {[p for p in state.adapters if '_0/' in p]}), "
        f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)"
    )
    _randomize(lm, seed=2, scale=0.01)
    live = _keras_logits(lm, x)
    merged, error = keras_relora.merge_relora(lm, x, return_error=True)
    for path, value in norms_before.items():
        np.testing.assert_array_equal(
            _variable(merged, path), value, err_msg=path
        )
    print(
        f"merge_relora copied {len(norms_before)} non-kernel variables "
        "(embedding, norms) bitwise"
    )
    merged_k = _keras_logits(merged, x)
    results["merge_error"] = {
        k: float(v) for k, v in error.items() if k != "samples"
    }
    results["merge_vs_live"] = _report(
        "merged (mean gates) vs live adapters, Keras",
        merged_k,
        live,
        float(np.abs(live - base_k).max()),
    )
    del lm
    merged.export_to_transformers(f"{tmp}/merged")
    with open(f"{tmp}/merged/config.json") as f:
        exported_config = json.load(f)
    with open(f"{tmp}/merged/model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header, "the export wrote an untied head"
    hf3 = _hf_model(f"{tmp}/merged")
    print(_check_hf_specifics(hf3, merged))
    results["export"] = _report(
        "merge_relora -> export_to_transformers -> AutoModelForCausalLM",
        _hf_logits(hf3, x),
        merged_k,
        float(np.abs(merged_k - base_k).max()),
    )
    results["exported_architectures"] = exported_config["architectures"]
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def _variable(model, path):
    for variable in model.backbone.weights:
        if variable.path == path:
            return keras.ops.convert_to_numpy(variable)
    raise KeyError(path)


if __name__ == "__main__":
    main()
