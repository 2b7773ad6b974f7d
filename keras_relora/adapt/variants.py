"""Named adapter settings, so methods compare by name."""

from keras_relora._checks import choice_arg
from keras_relora._checks import int_arg

# Each entry is a dict of `enable_relora` keyword arguments. LoRA,
# LoRA-FA, ShareLoRA, HydraLoRA and ReLoRA are configurations of one layer
# (the formula in the README). `relora` (a shared A, one B per layer) has
# the same adapter configuration as `sharelora`; the paper's ReLoRA adds
# the Reducer (`ReducerCallback`) on top, and `relora_multi` its routed B
# experts.
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

# The paper's hyper-parameters (Tables 9-11): `alpha = 2 * rank` and adapter
# dropout 0.05 (targets q, k, v, up, down: `enable_relora`'s default for
# decoders). `enable_relora` itself defaults to `alpha = rank` (as Keras's
# `enable_lora`) and no dropout; PEFT's `LoraConfig` to `lora_alpha=8` and
# `lora_dropout=0.0`.
PAPER_ALPHA_PER_RANK = 2.0
PAPER_DROPOUT = 0.05


def paper_defaults(rank, variant="relora_multi"):
    """`enable_relora` keyword arguments with the paper's hyper-parameters.

    The paper ("Less is more: resource-efficient low-rank adaptation",
    Tables 9-11) trains with `alpha = 2 * rank` and adapter dropout
    `0.05`. `alpha` depends on the rank, so the settings come from this
    function rather than from a fixed `VARIANTS` entry. Keras's
    `enable_lora` (and `enable_relora`) default to `alpha = rank` and no
    dropout; PEFT's `LoraConfig` to `lora_alpha=8`, `lora_dropout=0.0`.

    Args:
        rank: int. The adapter rank.
        variant: str. A key of `keras_relora.VARIANTS` for the adapter
            configuration. Defaults to `"relora_multi"` (the paper's
            routed B experts; add `ReducerCallback` for its Reducer).

    Returns:
        A new dict: `VARIANTS[variant]` with `rank`, `alpha = 2 * rank` and
        `dropout = 0.05`.

    Example:

    ```python
    lm.enable_relora(**keras_relora.paper_defaults(8))  # alpha=16.0
    ```
    """
    choice_arg("variant", variant, tuple(sorted(VARIANTS)))
    rank = int_arg("rank", rank, 1, "a positive int, e.g. `rank=8`")
    return {
        **VARIANTS[variant],
        "rank": rank,
        "alpha": PAPER_ALPHA_PER_RANK * rank,
        "dropout": PAPER_DROPOUT,
    }
