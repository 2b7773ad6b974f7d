"""Named adapter settings, so methods compare by name."""

# Each entry is a dict of `enable_relora` keyword arguments. LoRA,
# LoRA-FA, ShareLoRA, HydraLoRA and ReLoRA are configurations of one layer
# (DESIGN.md §2). `relora` (a shared A, one B per layer) has the same adapter
# configuration as `sharelora`; the paper's ReLoRA adds the Reducer
# (`ReducerCallback`) on top, and `relora_multi` its routed B experts.
VARIANTS = {
    "lora": {"experts": 1, "share_a": "layer"},
    "lora_fa": {"experts": 1, "share_a": "layer", "train_a": False},
    "sharelora": {"experts": 1, "share_a": "role"},
    "hydralora": {"experts": 4, "share_a": "layer", "router_input": "input"},
    "relora": {"experts": 1, "share_a": "role"},
    "relora_multi": {
        "experts": 4,
        "share_a": "role",
        "router_input": "projected",
    },
}
