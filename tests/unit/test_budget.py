"""`keras_relora.budget` reports what `enable_relora` reports, unallocated.

For a tiny config of every family the package supports, the plan made
without allocating weights (inside a `StatelessScope`) must equal, field
by field and as printed, the report of `enable_relora` on the real model.
"""

import math

import keras_hub
import pytest
import tiny_models

import keras_relora

LLAMA = {
    "vocabulary_size": tiny_models.VOCAB,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 8,
    "intermediate_dim": 16,
}

FAMILIES = {
    "llama3": (keras_hub.models.Llama3Backbone, LLAMA),
    "paligemma": (tiny_models.paligemma_backbone, {}),
    "bert": (tiny_models.bert_backbone, {}),
    "stable_diffusion3": (tiny_models.stable_diffusion3_backbone, {}),
    "functional": (tiny_models.functional_model, {}),
    "subclassed": (tiny_models.subclassed_model, {}),
}
# Plain Keras models have no known roles: their targets are layer names.
TARGETS = {
    "functional": ["hidden", "hidden_2"],
    "subclassed": ["up_0", "down_0", "up_1", "down_1"],
}

SETTINGS = {
    "relora_multi": dict(rank=4, experts=4),
    "lora": dict(rank=4, **keras_relora.VARIANTS["lora"]),
    "hydralora": dict(rank=2, **keras_relora.VARIANTS["hydralora"]),
    "lora_fa_input_router": dict(
        rank=2, experts=3, train_a=False, router_input="input"
    ),
}


def _fields(report):
    return {
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "base_params": report.base_params,
        "roles": report.roles,
        "num_blocks": report.num_blocks,
        "text": str(report),
    }


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_budget_equals_enable_relora(family, setting):
    build, config = FAMILIES[family]
    kwargs = dict(SETTINGS[setting])
    if family in TARGETS:
        kwargs["targets"] = TARGETS[family]
    planned = keras_relora.budget(build, config, **kwargs)
    model = build(**config)
    enabled = keras_relora.enable_relora(model, **kwargs)
    assert _fields(planned) == _fields(enabled)
    counted = sum(math.prod(v.shape) for v in model.trainable_weights)
    assert planned.trainable_params == counted
