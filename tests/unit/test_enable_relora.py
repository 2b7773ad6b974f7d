"""enable_relora on every supported family: fit, freezing, counts, errors."""

import re

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora

R, M = 4, 2  # rank and experts used throughout


def fit_and_check(
    model, x, y, loss, expected_trainable, sample_weight=None, steps=2
):
    """Fits a few steps; checks counts, frozen base bitwise, adapters move."""
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == expected_trainable
    assert all(
        "relora" in v.path or "lora_a" in v.path
        for v in model.trainable_weights
    )
    before = tm.snapshot(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    model.fit(x, y, sample_weight=sample_weight, epochs=steps, verbose=0)
    after = tm.snapshot(model)
    trainable_paths = {v.path for v in model.trainable_weights}
    tm.assert_unchanged(model, before, ignore=trainable_paths)
    moved = [
        p
        for p in trainable_paths
        if p.endswith("b_kernel") and np.abs(after[p] - before[p]).max() > 0
    ]
    assert moved, "no B expert trained"


def paths_unique(model):
    paths = [v.path for v in model.weights]
    assert len(paths) == len(set(paths))
    assert len({id(v) for v in model.weights}) == len(paths)


def llama_count(layers=2, hidden=8, inter=16, q_out=8, kv_out=4, r=R, m=M):
    a = 4 * hidden * r + inter * r  # q, k, v, up read hidden; down inter
    b = m * r * (q_out + 2 * kv_out + inter + hidden) * layers
    router = r * m * 5 * layers
    return a + b + router


def test_llama3_causal_lm_fit():
    lm = tm.llama3_causal_lm()
    report = lm.enable_relora(rank=R, experts=M)
    x, y, w = tm.lm_data()
    fit_and_check(
        lm,
        x,
        y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        llama_count(),
        sample_weight=w,
    )
    assert report.trainable_params == llama_count()
    assert set(report.roles) == {"q", "k", "v", "up", "down"}
    assert report.num_blocks == 2
    paths_unique(lm)
    blocks = {
        a.block
        for p, a in keras_relora.get_state(lm).adapters.items()
        if p.startswith("transformer_layer_1/")
    }
    assert blocks == {1}


def test_llama3_backbone_fit_with_share_a_layer():
    backbone = tm.llama3_backbone()
    backbone.enable_relora(rank=R, experts=1, share_a="layer")
    x = tm.token_batch()
    y = np.zeros((4, 6, 8), "float32")
    # LoRA: one A per layer, no router.
    a = (4 * 8 * R + 16 * R) * 2
    b = R * (8 + 4 + 4 + 16 + 8) * 2
    fit_and_check(backbone, x, y, "mse", a + b)


def test_train_a_false_freezes_a():
    backbone = tm.llama3_backbone()
    backbone.enable_relora(rank=R, experts=M, train_a=False)
    assert not any("shared_a" in v.path for v in backbone.trainable_weights)
    a_params = 4 * 8 * R + 16 * R
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    assert trainable == llama_count() - a_params


def test_paligemma_decoder_by_default_and_vision_graph_nodes_when_asked():
    backbone = tm.paligemma_backbone()
    state_report = backbone.enable_relora(rank=R, experts=M)
    state = keras_relora.get_state(backbone)
    assert all(p.startswith("decoder_block_") for p in state.adapters)
    assert state_report.num_blocks == 2
    lm = (
        keras_relora.unload(backbone)
        if hasattr(keras_relora, "unload")
        else None
    )
    del lm
    # Vision encoder layers are nodes of a functional graph.
    backbone = tm.paligemma_backbone()
    x, _ = tm.paligemma_data()
    base = ops.convert_to_numpy(backbone(x))
    keras_relora.enable_relora(
        backbone,
        rank=R,
        experts=M,
        targets=r"image_encoder/.*(query_proj|value_proj)$",
    )
    state = keras_relora.get_state(backbone)
    assert len(state.adapters) == 4
    np.testing.assert_array_equal(ops.convert_to_numpy(backbone(x)), base)
    for adapter in state.adapters.values():
        adapter.b_kernel.assign(np.ones(adapter.b_kernel.shape, "float32"))
    assert np.abs(ops.convert_to_numpy(backbone(x)) - base).max() > 1e-3


def test_paligemma_causal_lm_fit():
    import keras_hub

    backbone = tm.paligemma_backbone()
    lm = keras_hub.models.PaliGemmaCausalLM(
        backbone=backbone, preprocessor=None
    )
    lm.enable_relora(rank=R, experts=M)
    x, y = tm.paligemma_data()
    # Gemma decoder: q/k/v einsum (hidden 8 -> 2x4, 1x4); Gemma's gated
    # FFN uses intermediate_dim // 2: Dense 8 -> 8 (up), 8 -> 8 (down).
    q_out, kv_out, inter, hidden = 8, 4, 8, 8
    expected = llama_count(
        q_out=q_out, kv_out=kv_out, inter=inter, hidden=hidden
    )
    fit_and_check(
        lm,
        x,
        y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        expected,
    )


def test_stable_diffusion3_flow_matching_step():
    backbone = tm.stable_diffusion3_backbone()
    backbone.enable_relora(rank=R, experts=M)
    state = keras_relora.get_state(backbone)
    roles = {a.role for a in state.adapters.values()}
    assert roles == {"qkv", "o"}
    assert all(p.startswith("joint_block_") for p in state.adapters)
    diffuser = backbone.diffuser
    rng = np.random.default_rng(0)
    n = 4
    x0 = rng.normal(size=(n, 2, 2, 4)).astype("float32")
    noise = rng.normal(size=x0.shape).astype("float32")
    t = rng.uniform(size=(n, 1)).astype("float32")
    # Rectified flow: x_t = (1 - t) x0 + t noise, target velocity noise - x0.
    xt = (1 - t[:, :, None, None]) * x0 + t[:, :, None, None] * noise
    inputs = {
        "latent": xt,
        "context": rng.normal(size=(n, 3, 4096)).astype("float32"),
        "pooled_projection": rng.normal(size=(n, 16)).astype("float32"),
        "timestep": t * 1000.0,
    }
    qkv = [a for a in state.adapters.values() if a.role == "qkv"]
    proj = [a for a in state.adapters.values() if a.role == "o"]
    expected = (
        (16 * R) * 2
        + R * M * (48 * len(qkv) + 16 * len(proj))
        + R * M * (len(qkv) + len(proj))
    )
    fit_and_check(diffuser, inputs, noise - x0, "mse", expected)


def test_bert_encoder_classifier_fit():
    import keras_hub

    backbone = tm.bert_backbone()
    clf = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )
    head = [v.path for v in clf.weights if v.path.startswith("logits/")]
    clf.enable_relora(rank=R, experts=M)
    x = tm.bert_data()
    y = np.array([0, 1, 0, 1])
    # The task's own head (logits: 8 x 2 + 2) trains with the adapters, as
    # with keras-hub's enable_lora (`train_layers=None`).
    trainable = {v.path for v in clf.trainable_weights}
    assert set(head) <= trainable
    assert trainable - set(head) == {
        p for p in trainable if "relora" in p or "lora_a" in p
    }
    before = tm.snapshot(clf)
    clf.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    clf.fit(x, y, epochs=2, verbose=0)
    after = tm.snapshot(clf)
    tm.assert_unchanged(clf, before, ignore=trainable)
    assert all(np.abs(after[p] - before[p]).max() > 0 for p in head)
    # train_layers=[]: the head is frozen with the rest of the base.
    frozen = keras_hub.models.BertTextClassifier(
        tm.bert_backbone(), num_classes=2, preprocessor=None
    )
    frozen.enable_relora(rank=R, experts=M, train_layers=[])
    fit_and_check(
        frozen,
        x,
        y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        llama_count(q_out=8, kv_out=8),
    )


def test_functional_model_adapts_every_dense():
    model = tm.functional_model()
    report = model.enable_relora(rank=2, experts=2)
    state = keras_relora.get_state(model)
    assert sorted(state.adapters) == ["head", "hidden", "hidden_2"]
    assert report.num_blocks == 3
    # hidden (6->12) and hidden_2 (12->12) share the role but not d_in.
    a = 6 * 2 + 12 * 2 + 12 * 2
    b = 2 * 2 * (12 + 12 + 3)
    router = 2 * 2 * 3
    x, y = tm.dense_data()
    fit_and_check(model, x, y, "mse", a + b + router)


def test_subclassed_model_shares_a_by_role():
    model = tm.subclassed_model()
    model.enable_relora(rank=2, experts=2, targets=["up", "down"])
    state = keras_relora.get_state(model)
    assert len(state.adapters) == 4
    ups = [a for p, a in state.adapters.items() if "up_" in p]
    assert ups[0].shared_a is ups[1].shared_a
    a = 6 * 2 + 16 * 2
    b = 2 * 2 * (16 + 6) * 2
    router = 2 * 2 * 4
    x, y = tm.dense_data()
    fit_and_check(model, x, y, "mse", a + b + router)


def test_save_weights_round_trip(tmp_path):
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=R, experts=M)
    rng = np.random.default_rng(0)
    for v in lm.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    x = tm.token_batch()
    want = ops.convert_to_numpy(lm(x))
    lm.save_weights(tmp_path / "w.weights.h5")
    other = tm.llama3_causal_lm()
    other.enable_relora(rank=R, experts=M)
    other.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(ops.convert_to_numpy(other(x)), want)


def test_mixed_bfloat16_backbone_trains():
    keras.config.set_dtype_policy("mixed_bfloat16")
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=R, experts=M)
    assert all(v.dtype == "float32" for v in lm.trainable_weights)
    x, y, w = tm.lm_data()
    fit_and_check(
        lm,
        x,
        y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        llama_count(),
        sample_weight=w,
    )


def test_int8_quantized_backbone_trains():
    lm = tm.llama3_causal_lm()
    tm.quantize(lm, "int8")
    lm.enable_relora(rank=R, experts=M)
    x, y, w = tm.lm_data()
    base = ops.convert_to_numpy(lm(x))
    fit_and_check(
        lm,
        x,
        y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        llama_count(),
        sample_weight=w,
    )
    # The adapters are live on the quantized path.
    assert np.abs(ops.convert_to_numpy(lm(x)) - base).max() > 0


def test_refuses_twice():
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=R, experts=M)
    with pytest.raises(ValueError, match="already enabled"):
        lm.enable_relora(rank=R, experts=M)
    with pytest.raises(ValueError, match="already enabled"):
        keras_relora.enable_relora(lm.backbone)


def test_no_match_lists_what_exists():
    backbone = tm.llama3_backbone()
    with pytest.raises(ValueError) as info:
        backbone.enable_relora(targets=["nope"])
    message = str(info.value)
    assert "'nope'" in message
    assert "'gate'" in message and "'feedforward_gate_dense'" in message
    # Nothing was changed by the refused call.
    assert keras_relora.get_state(backbone) is None
    assert backbone.trainable_weights


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank=0), "Received: rank=0"),
        (dict(experts=0), "Received: experts=0"),
        (dict(share_a="block"), "Received: share_a='block'"),
        (dict(top_k=3), "Received: top_k=3"),
        (dict(router_input="x"), "Received: router_input='x'"),
        (dict(layout_map={"q": (None,)}), "Received: layout_map of type dict"),
    ],
)
def test_argument_errors(kwargs, message):
    backbone = tm.llama3_backbone()
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_relora.enable_relora(backbone, **{"experts": 2, **kwargs})


def test_targets_by_name_and_regex():
    backbone = tm.llama3_backbone()
    backbone.enable_relora(
        rank=R, experts=1, targets=["query", "feedforward_gate_dense"]
    )
    roles = {a.role for a in keras_relora.get_state(backbone).adapters.values()}
    assert roles == {"q", "gate"}
    other = tm.llama3_backbone()
    other.enable_relora(rank=R, experts=1, targets=r"layer_1/.*value$")
    assert list(keras_relora.get_state(other).adapters) == [
        "transformer_layer_1/self_attention/value"
    ]


def test_variants_configure_the_known_methods():
    v = keras_relora.VARIANTS
    assert set(v) == {
        "lora",
        "lora_fa",
        "sharelora",
        "hydralora",
        "relora",
        "relora_multi",
    }
    for name, kwargs in v.items():
        backbone = tm.llama3_backbone()
        report = backbone.enable_relora(rank=R, **kwargs)
        shared = keras_relora.get_state(backbone).shared_a
        assert len(shared) == (10 if kwargs["share_a"] == "layer" else 5)
        assert report.trainable_params > 0, name
