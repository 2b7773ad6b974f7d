"""ReLoRA on a Gemma 3 base quantized with Keras (int8 and int4).

On a tiny random Gemma 3 (tied embeddings, the embedding scale, query/key
norms, sliding-window blocks): training moves the adapters only, the
adapter file, the `.keras` file and a PEFT folder each load back to the
same logits bitwise, and `merge_relora` refuses the quantized kernels
with the way out. With int8 the token embedding (the tied head) stays
float (`tm.quantize`): Keras's int8 reverse call passes no gradient.
"""

import keras
import numpy as np
import pytest
import tiny_models as tm

import keras_relora

pytest.importorskip("keras_hub")

MODES = ["int8", "int4"]
KWARGS = {"rank": 2, "experts": 2}


def _quantized(mode):
    """A quantized tiny Gemma 3."""
    lm = tm.gemma3_causal_lm()
    tm.quantize(lm, mode)
    return lm


def _pair(mode):
    """Two quantized tiny Gemma 3 models with the same base weights."""
    source, target = tm.gemma3_causal_lm(), tm.gemma3_causal_lm(seed=1)
    for s, t in zip(source.weights, target.weights, strict=True):
        t.assign(s)
    tm.quantize(source, mode)
    tm.quantize(target, mode)
    return source, target


def _logits(lm, x):
    return np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)))


def _batch():
    x = tm.token_batch(batch=3, seq=10)
    x["padding_mask"][2, 7:] = 0
    return x


@pytest.mark.parametrize("mode", MODES)
def test_quantized_gemma3_trains_the_adapters_only(mode):
    lm = _quantized(mode)
    lm.enable_relora(**KWARGS)
    state = keras_relora.get_state(lm)
    assert len(state.adapters) == 6 * 5  # q, k, v, up, down in 6 blocks.
    assert all(
        a._base_layer.dtype_policy.quantization_mode == mode
        for a in state.adapters.values()
    )
    embedding = lm.backbone.token_embedding.dtype_policy.quantization_mode
    assert embedding == (None if mode == "int8" else mode)
    adapter_paths = set(state.variables())
    before = tm.snapshot(lm)
    x, y, weight = tm.lm_data(seq=10)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=keras.config.backend() == "tensorflow",
    )
    lm.fit(x, y, sample_weight=weight, batch_size=4, epochs=2, verbose=0)
    after = tm.snapshot(lm)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    # Every layer's B moved (the shared A is trained too).
    moved_b = {p for p in changed if "b_kernel" in p}
    assert len(moved_b) == len(state.adapters)
    assert changed <= adapter_paths
    tm.assert_unchanged(lm, before, ignore=adapter_paths)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_gemma3_saves_and_loads_exactly(tmp_path, mode):
    source, target = _pair(mode)
    x = _batch()
    base_logits = _logits(source, x)
    source.enable_relora(**KWARGS)
    tm.randomize_adapters(source)
    expected = _logits(source, x)
    assert np.abs(expected - base_logits).max() > 1e-2
    # The adapter file onto the same quantized base.
    source.save_relora_weights(tmp_path / "adapters.safetensors")
    target.enable_relora(**KWARGS)
    target.load_relora_weights(tmp_path / "adapters.safetensors")
    np.testing.assert_array_equal(_logits(target, x), expected)
    # The whole adapted model through a `.keras` file.
    source.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(_logits(loaded, x), expected)
    assert keras_relora.get_state(loaded) is not None
    # Every weight comes back with its dtype and bits: the quantized
    # kernels stay quantized (int8 storage, int4 packed two per byte).
    tm.assert_unchanged(loaded, tm.snapshot(source))
    stored = tm.snapshot(loaded)
    assert stored["decoder_block_0/attention/query/kernel"].dtype == np.int8


@pytest.mark.parametrize("mode", MODES)
def test_quantized_gemma3_peft_folder_round_trip(tmp_path, mode):
    source, target = _pair(mode)
    x = _batch()
    source.enable_relora(rank=2, **keras_relora.VARIANTS["lora"])
    tm.randomize_adapters(source)
    keras_relora.save_peft(source, tmp_path / "adapter")
    target.enable_relora(rank=2, **keras_relora.VARIANTS["lora"])
    keras_relora.load_peft(target, tmp_path / "adapter")
    np.testing.assert_array_equal(_logits(target, x), _logits(source, x))


@pytest.mark.parametrize("mode", MODES)
def test_quantized_gemma3_merge_is_refused(mode):
    lm = _quantized(mode)
    lm.enable_relora(**KWARGS)
    before = tm.snapshot(lm)
    with pytest.raises(
        ValueError,
        match=r"`merge_relora` cannot fold adapters into quantized kernels"
        r".*decoder_block_0.*quantize\('int8'\)",
    ):
        keras_relora.merge_relora(lm)
    tm.assert_unchanged(lm, before)


def test_int4_head_of_another_model_is_refused_on_load():
    lm = _quantized("int4")
    lm.enable_relora(**KWARGS)
    config = keras.saving.serialize_keras_object(lm)
    paths = config["config"]["relora"]["weight_only_int4_embeddings"]
    assert paths == ["token_embedding"]
    config["config"]["relora"]["weight_only_int4_embeddings"] = ["embedding"]
    with pytest.raises(
        ValueError,
        match=r"saved int4 `ReversibleEmbedding` layers \['embedding'\] are "
        r"not int4 `ReversibleEmbedding` layers of the rebuilt model",
    ):
        keras.saving.deserialize_keras_object(config)
