"""A keras-hub Task's own layers train with the adapters (`train_layers`),
and their weights travel with the adapters: adapter files, merge, unload."""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora

HEAD = ("logits/kernel", "logits/bias")
LOSS = "sparse_categorical_crossentropy"


def _classifier(num_classes=2, backbone=None):
    return keras_hub.models.BertTextClassifier(
        backbone or tm.bert_backbone(),
        num_classes=num_classes,
        preprocessor=None,
        activation="softmax",
    )


def _same_base(source, num_classes=2):
    """A new classifier whose backbone holds `source`'s backbone weights."""
    backbone = tm.bert_backbone()
    for s, t in zip(source.backbone.weights, backbone.weights, strict=True):
        t.assign(ops.convert_to_numpy(s).copy())
    return _classifier(num_classes, backbone)


def _fit(model, steps=2):
    x, y = tm.bert_data(), np.array([0, 1, 0, 1])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    model.fit(x, y, epochs=steps, verbose=0)
    return x


def _predict(model, x):
    return np.asarray(ops.convert_to_numpy(model(x, training=False)))


def test_head_trains_by_default_and_round_trips_through_the_file(tmp_path):
    clf = _classifier()
    plain = _same_base(clf)
    for s, t in zip(clf.weights, plain.weights, strict=True):
        t.assign(ops.convert_to_numpy(s).copy())  # The same random head.
    report = clf.enable_relora(rank=2, experts=2)
    state = keras_relora.get_state(clf)
    assert sorted(state.trained) == sorted(HEAD)
    assert report.trainable_params == sum(
        int(np.prod(v.shape)) for v in clf.trainable_weights
    )
    before = tm.snapshot(clf)
    x = _fit(clf)
    after = tm.snapshot(clf)
    for path in HEAD:
        assert np.abs(after[path] - before[path]).max() > 0, path
    trainable = {v.path for v in clf.trainable_weights}
    tm.assert_unchanged(clf, before, ignore=trainable)
    # The adapter file carries the head; a plain model gets it back.
    clf.save_relora_weights(tmp_path / "adapters.safetensors")
    plain.load_relora_weights(tmp_path / "adapters.safetensors")
    restored = tm.snapshot(plain)
    for path in HEAD:
        np.testing.assert_array_equal(restored[path], after[path])
    np.testing.assert_array_equal(_predict(plain, x), _predict(clf, x))
    assert len(plain.trainable_weights) == len(trainable)
    assert set(HEAD) <= {v.path for v in plain.trainable_weights}


def test_a_file_with_another_head_shape_is_refused(tmp_path):
    clf = _classifier()
    wide = _same_base(clf, num_classes=3)
    frozen = _same_base(clf)
    clf.enable_relora(rank=2, experts=1)
    clf.save_relora_weights(tmp_path / "adapters.safetensors")
    before = tm.snapshot(wide)
    with pytest.raises(
        ValueError,
        match=r"shape of trained/logits/kernel: "
        r"file \(8, 2\), model \(8, 3\)",
    ):
        wide.load_relora_weights(tmp_path / "adapters.safetensors")
    assert keras_relora.get_state(wide) is None
    tm.assert_unchanged(wide, before)
    # A model adapted with a frozen head has no head in its file.
    frozen.enable_relora(rank=2, experts=1, train_layers=[])
    with pytest.raises(
        ValueError,
        match=r"variables in the file, not in "
        r"the model: \['trained/logits/bias', "
        r"'trained/logits/kernel'\]",
    ):
        frozen.load_relora_weights(tmp_path / "adapters.safetensors")


def test_merge_keeps_the_trained_head_and_unload_restores_flags():
    clf = _classifier()
    flags = [v.trainable for v in clf.weights]
    clf.enable_relora(rank=2, experts=1)
    x = _fit(clf)
    merged = keras_relora.merge_relora(clf)
    np.testing.assert_allclose(_predict(merged, x), _predict(clf, x), atol=1e-6)
    trained = tm.snapshot(clf)
    merged_values = tm.snapshot(merged)
    for path in HEAD:
        np.testing.assert_array_equal(merged_values[path], trained[path])
    keras_relora.unload(clf)
    assert [v.trainable for v in clf.weights] == flags


def test_train_layers_chooses_the_layers():
    clf = _classifier()
    clf.enable_relora(rank=2, experts=1, train_layers=[])
    assert keras_relora.get_state(clf).trained == {}
    assert all(
        "relora" in v.path or "lora_a" in v.path for v in clf.trainable_weights
    )
    keras_relora.unload(clf)
    # By name, also a layer inside the backbone.
    clf.enable_relora(
        rank=2, experts=1, train_layers=["logits", "embeddings_layer_norm"]
    )
    trained = sorted(keras_relora.get_state(clf).trained)
    assert trained == sorted(
        [*HEAD, "embeddings_layer_norm/gamma", "embeddings_layer_norm/beta"]
    )
    keras_relora.unload(clf)
    with pytest.raises(
        ValueError,
        match=r"does not have: \['nope'\].*"
        r"Received: train_layers=\['nope'\]",
    ):
        clf.enable_relora(rank=2, experts=1, train_layers=["nope"])
    with pytest.raises(ValueError, match=r"adapted layers in full"):
        clf.enable_relora(
            rank=2, experts=1, targets=["q"], train_layers=["query"]
        )
    with pytest.raises(TypeError, match=r"Received: train_layers='logits'"):
        clf.enable_relora(rank=2, experts=1, train_layers="logits")
    assert keras_relora.get_state(clf) is None
    assert all(v.trainable for v in clf.weights)


def test_a_backbone_trains_no_extra_layer_by_default():
    backbone = tm.llama3_backbone()
    backbone.enable_relora(rank=2, experts=1)
    assert keras_relora.get_state(backbone).trained == {}


def test_keras_file_keeps_the_trainable_head(tmp_path):
    clf = _classifier()
    clf.enable_relora(rank=2, experts=1)
    x = _fit(clf)
    clf.save(tmp_path / "clf.keras")
    restored = keras.models.load_model(tmp_path / "clf.keras")
    np.testing.assert_allclose(
        _predict(restored, x), _predict(clf, x), atol=1e-6
    )
    assert sorted(keras_relora.get_state(restored).trained) == sorted(HEAD)


def test_the_head_trains_under_the_reducer():
    clf = _classifier()
    clf.enable_relora(rank=2, experts=2)
    before = tm.snapshot(clf)
    x, y = tm.bert_data(), np.array([0, 1, 0, 1])
    clf.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    clf.fit(
        x,
        y,
        epochs=3,
        verbose=0,
        callbacks=[
            keras_relora.ReducerCallback(update_layers=1, interval=1, trials=2)
        ],
    )
    after = tm.snapshot(clf)
    for path in HEAD:  # No mask holds the head: it moves every step.
        assert np.abs(after[path] - before[path]).max() > 0, path
