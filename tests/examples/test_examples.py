"""The examples run end to end in their `--tiny` mode, on this backend.

Each example's `main(argv)` is called in this process (keras-hub is
imported once for the suite, not once per example); it returns what it
measured and printed.
"""

import importlib
import math
import os
import sys

import keras
import numpy as np
import pytest

import keras_relora

EXAMPLES = os.path.join(
    os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ),
    "examples",
)


def run(name, tmp_path, *flags):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    module = importlib.import_module(name)
    return module.main(["--tiny", "--output-dir", str(tmp_path), *flags])


def check_files(paths):
    for path in paths.values():
        assert os.path.getsize(path) > 0, path


@pytest.mark.parametrize("experts", [1, 2])
def test_custom_model(tmp_path, capsys, experts):
    result = run("custom_model", tmp_path, "--experts", str(experts))
    out = capsys.readouterr().out
    for key in (
        "base_upright",
        "base_rotated",
        "tuned_rotated",
        "merged_rotated",
    ):
        assert 0.0 <= result[key] <= 1.0
    assert result["reloaded_identical"]
    check_files(result["paths"])
    # The merged model is plain Keras: no keras_relora state, and it
    # loads without the package's custom objects.
    merged = keras.models.load_model(result["paths"]["merged"])
    assert keras_relora.get_state(merged) is None
    assert not any("relora" in v.path for v in merged.weights)
    assert "merge_relora" in out and "after ReLoRA" in out
    if experts == 1:
        # One B per layer: the merge is exact (float32 rounding aside, which
        # may flip a near-tie), so the accuracy is the adapted model's.
        assert abs(result["merged_rotated"] - result["tuned_rotated"]) <= 1 / 64
        assert "exact merge" in out
    else:
        assert "mean gates" in out


def test_stable_diffusion3(tmp_path, capsys):
    result = run("stable_diffusion3_relora", tmp_path)
    out = capsys.readouterr().out
    assert math.isfinite(result["loss_before"])
    assert math.isfinite(result["loss_after"])
    assert result["loss_after"] != result["loss_before"]  # it trained
    check_files(result["paths"])
    assert "Flow-matching loss" in out and "samples_after.png" in out
    # The adapter checkpoint loads into a fresh MMDiT of the same config.
    module = sys.modules["stable_diffusion3_relora"]
    diffuser = module.offline_backbone(16, 0, "tiny").diffuser
    keras_relora.load_relora_weights(diffuser, result["paths"]["adapters"])
    state = keras_relora.get_state(diffuser)
    assert {a.role for a in state.adapters.values()} == {"qkv", "o"}


def test_paligemma_vqa(tmp_path, capsys):
    result = run("paligemma_vqa", tmp_path)
    out = capsys.readouterr().out
    for when in ("before", "after"):
        for value in result[when].values():
            assert 0.0 <= value <= 1.0
    check_files(result["paths"])
    assert "Held-out answer accuracy" in out
    assert "Generated answers" in out


def test_digit_images_are_seeded():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import digit_images

    a = digit_images.render_digits(6, 16, seed=3)
    b = digit_images.render_digits(6, 16, seed=3)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x, y)
    images, digits, _ = a
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert digits.min() >= 0 and digits.max() <= 9
    assert digit_images.caption(7, 0) == "a red digit seven"
    # The ink is darker than the background in every image.
    assert all(image.min() < 150 for image in images)
