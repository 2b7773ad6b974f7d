"""Whole-model `.keras` files keep live adapters.

keras-hub rebuilds a model from its constructor config, so a plain
`load_model` would raise or silently drop injected adapters; these tests
check that the loaded model has its adapters, values and outputs.
"""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models as tm

import keras_relora
from keras_relora.adapt import model_class
from keras_relora.reducer.reducer_state import reducer_state

# Compiling a train step is slow on TF (tracing) and not what these tests
# are about; on JAX the jitted step is the fast one.
FAST = {"run_eagerly": keras.config.backend() == "tensorflow"}


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_same_adapters(a, b):
    va = keras_relora.get_state(a).variables()
    vb = keras_relora.get_state(b).variables()
    assert list(va) == list(vb)
    for key in va:
        np.testing.assert_array_equal(to_numpy(va[key]), to_numpy(vb[key]))


def test_backbone_round_trip_keeps_live_adapters(tmp_path):
    x = tm.token_batch()
    backbone = tm.llama3_backbone()
    base_y = to_numpy(backbone(x))
    backbone.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(backbone)
    y = to_numpy(backbone(x))
    assert np.abs(y - base_y).max() > 1e-2  # The adapters matter.
    path = tmp_path / "backbone.keras"
    backbone.save(path)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_hub.models.Llama3Backbone)
    assert model_class.base_class(loaded) is keras_hub.models.Llama3Backbone
    state = keras_relora.get_state(loaded)
    assert state.settings == keras_relora.get_state(backbone).settings
    assert_same_adapters(backbone, loaded)
    assert len(loaded.trainable_weights) == len(backbone.trainable_weights)
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)


def test_model_checkpoint_of_a_task(tmp_path):
    x, y, _ = tm.lm_data()
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=2, targets=["q", "v", "down"])
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **FAST,
    )
    path = tmp_path / "ckpt.keras"
    lm.fit(
        x,
        y,
        batch_size=4,
        epochs=1,
        verbose=0,
        callbacks=[keras.callbacks.ModelCheckpoint(str(path))],
    )
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_hub.models.Llama3CausalLM)
    assert keras_relora.get_state(loaded) is not None
    assert_same_adapters(lm, loaded)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(lm(x)))


def test_functional_model_resumes_training_exactly(tmp_path):
    x, y = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", **FAST)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded.run_eagerly = model.run_eagerly

    slots = [to_numpy(v) for v in model.optimizer.variables]
    loaded_slots = [to_numpy(v) for v in loaded.optimizer.variables]
    assert len(slots) == len(loaded_slots) > 2
    for a, b in zip(slots, loaded_slots, strict=False):
        np.testing.assert_array_equal(a, b)
    # One more step on both: the same update.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert_same_adapters_close(model, loaded)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


def assert_same_adapters_close(a, b):
    va = keras_relora.get_state(a).variables()
    vb = keras_relora.get_state(b).variables()
    for key in va:
        np.testing.assert_allclose(
            to_numpy(va[key]), to_numpy(vb[key]), rtol=1e-6, atol=1e-7
        )


def test_subclassed_model_with_custom_objects(tmp_path):
    x, _ = tm.dense_data()
    model = tm.subclassed_model()
    model.enable_relora(rank=2, experts=1, share_a="layer")
    tm.randomize_adapters(model)
    y = to_numpy(model(x))
    path = tmp_path / "sub.keras"
    model.save(path)
    loaded = keras.models.load_model(
        path, custom_objects={"TwoBlockMLP": tm.TwoBlockMLP}
    )
    assert isinstance(loaded, tm.TwoBlockMLP)
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)


def test_pruned_adapters_and_reducer_scores(tmp_path):
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2, share_a="layer")
    tm.randomize_adapters(model)
    reducer_state(model, create_seed=3).scores.assign([0.5, -1.0, 2.0])
    keras_relora.prune(model, 1 / 3, strategy="random", seed=1)
    y = to_numpy(model(x))
    path = tmp_path / "pruned.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    pruned = {
        p for p, a in keras_relora.get_state(model).adapters.items() if a.pruned
    }
    assert pruned == {
        p
        for p, a in keras_relora.get_state(loaded).adapters.items()
        if a.pruned
    }
    np.testing.assert_array_equal(
        to_numpy(reducer_state(loaded).scores), [0.5, -1.0, 2.0]
    )
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)


def test_formats_that_would_drop_adapters_refuse(tmp_path):
    backbone = tm.llama3_backbone()
    backbone.enable_relora(rank=2, experts=1, targets=["q"])
    with pytest.raises(ValueError, match="save_relora_weights"):
        backbone.save(tmp_path / "legacy.h5")
    assert not (tmp_path / "legacy.h5").exists()
    with pytest.raises(ValueError, match="merge_relora"):
        backbone.save_to_preset(str(tmp_path / "preset"))
    assert not (tmp_path / "preset" / "config.json").exists()
    # The backbone of an adapted Task refuses too.
    lm = tm.llama3_causal_lm()
    lm.enable_relora(rank=2, experts=1, targets=["q"])
    for model in (lm, lm.backbone):
        with pytest.raises(ValueError, match="merge_relora"):
            model.save_to_preset(str(tmp_path / "preset"))
    keras_relora.unload(lm)
    assert "save_to_preset" not in lm.backbone.__dict__
    # After `unload` the model saves (and loads) as the plain base.
    keras_relora.unload(backbone)
    backbone.save(tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert type(loaded) is keras_hub.models.Llama3Backbone
    assert keras_relora.get_state(loaded) is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base(tmp_path, mode):
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.quantize(mode)
    model.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(model)
    y = to_numpy(model(x))
    model.save(tmp_path / f"{mode}.keras")
    loaded = keras.models.load_model(tmp_path / f"{mode}.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)
    # The adapter checkpoint loads onto the same quantized base too.
    model.save_relora_weights(tmp_path / f"{mode}.safetensors")
    base = tm.functional_model()
    base(x)
    base.quantize(mode)
    relora = {id(v) for v in keras_relora.get_state(model).variables().values()}
    source = [v for v in model.weights if id(v) not in relora]
    for variable, value in zip(base.weights, source, strict=False):
        variable.assign(value)
    base.load_relora_weights(tmp_path / f"{mode}.safetensors")
    np.testing.assert_array_equal(to_numpy(base(x)), y)


def test_int4_tied_head_round_trip(tmp_path):
    # Keras rebuilds an int4 `ReversibleEmbedding` from a file with an
    # activation quantizer that `quantize("int4")` does not give it: the
    # adapted model's file keeps the head weight-only, as it was saved.
    lm = tm.llama3_causal_lm(tie_word_embeddings=True)
    tm.quantize(lm, "int4")
    lm.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(lm)
    x = tm.token_batch()
    y = to_numpy(lm(x))
    lm.save(tmp_path / "int4.keras")
    loaded = keras.models.load_model(tmp_path / "int4.keras")
    assert loaded.backbone.token_embedding.quantization_mode == "int4"
    assert loaded.backbone.token_embedding.inputs_quantizer is None
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)


@pytest.mark.parametrize("holder", ["task", "backbone"])
def test_tied_embeddings_round_trip(tmp_path, holder):
    # keras-hub 0.32's Llama `get_config` omits `tie_word_embeddings`
    # (SmolLM2 ties them): a `.keras` file of the adapted model must still
    # rebuild the tied head, not fail with "expected 2 variables".
    lm = tm.llama3_causal_lm(tie_word_embeddings=True)
    model = lm if holder == "task" else lm.backbone
    model.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(model)
    x = tm.token_batch()
    path = str(tmp_path / "tied.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    tied = restored.backbone if holder == "task" else restored
    assert tied.tie_word_embeddings
    assert len(restored.weights) == len(model.weights)
    assert_same_adapters(model, restored)
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(model(x)))
