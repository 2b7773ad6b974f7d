"""SmolLM2-135M through the Hugging Face stack: PEFT folders both ways.

1. keras-hub vs transformers logits of the same base weights;
2. `keras_relora.save_peft` of a rank-8 `lora` adapter (random B) loaded
   by `peft.PeftModel.from_pretrained` on transformers, vs the Keras model;
3. a folder written by `peft.get_peft_model(...).save_pretrained` (random
   lora_B) loaded by `keras_relora.load_peft` into a fresh Keras model.

Prints the largest absolute logit differences (not a timing).

    KERAS_BACKEND=torch OMP_NUM_THREADS=2 \
        .venv/bin/python benchmarks/smollm2_peft_check.py
"""

import tempfile

import keras
import numpy as np
import peft
import torch
import transformers

import keras_relora
from relora_offline import smollm2

MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


def main():
    torch.set_num_threads(2)
    folder = smollm2.convert_smollm2()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (2, 32)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

    def hf_logits(model):
        with torch.no_grad():
            return model(
                input_ids=torch.tensor(ids).long(),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
            ).logits.numpy()

    def keras_logits(lm):
        hidden = lm.backbone(x)
        logits = lm.backbone.token_embedding(hidden, reverse=True)
        return np.asarray(keras.ops.convert_to_numpy(logits))

    lm = smollm2.load_smollm2(dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval()
    base_k, base_h = keras_logits(lm), hf_logits(hf)
    print(
        f"base, keras-hub vs transformers: max |diff| "
        f"{np.abs(base_k - base_h).max():.3g} "
        f"(logits up to {np.abs(base_h).max():.3g})"
    )

    lm.enable_relora(rank=8, **keras_relora.VARIANTS["lora"])
    for adapter in keras_relora.get_state(lm).adapters.values():
        adapter.b_kernel.assign(
            rng.normal(0, 0.02, adapter.b_kernel.shape).astype("float32")
        )
    adapted_k = keras_logits(lm)
    tmp = tempfile.mkdtemp()
    keras_relora.save_peft(lm, f"{tmp}/ours")
    adapted_h = hf_logits(
        peft.PeftModel.from_pretrained(hf, f"{tmp}/ours").eval()
    )
    print(
        f"save_peft -> PeftModel: max |diff| "
        f"{np.abs(adapted_k - adapted_h).max():.3g} (the adapter moved "
        f"the logits by {np.abs(adapted_k - base_k).max():.3g})"
    )

    hf2 = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    )
    made = peft.get_peft_model(
        hf2, peft.LoraConfig(r=8, lora_alpha=16, target_modules=MODULES)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_B" in name:
                parameter.copy_(
                    0.02 * torch.randn(parameter.shape, generator=generator)
                )
    made.save_pretrained(f"{tmp}/theirs")
    reference = hf_logits(made.eval())
    lm2 = smollm2.load_smollm2(dtype="float32")
    keras_relora.load_peft(lm2, f"{tmp}/theirs")
    print(
        f"peft's folder -> load_peft: max |diff| "
        f"{np.abs(keras_logits(lm2) - reference).max():.3g} (the adapter "
        f"moved the logits by {np.abs(reference - base_h).max():.3g})"
    )


if __name__ == "__main__":
    main()
