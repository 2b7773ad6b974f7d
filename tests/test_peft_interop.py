"""Hugging Face interop: no export drops adapters; merged transformers
folders and PEFT adapter folders load in `transformers`/`peft` with the
Keras model's logits.

`transformers` and `peft` run on torch (CPU) in this process whatever
`KERAS_BACKEND` is; the Keras side runs on the backend under test.
"""

import os

import keras
import numpy as np
import pytest

import keras_relora
from tests import tiny_models as tm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def _causal_lm():
    return tm.llama3_causal_lm(tie_word_embeddings=True)


def _hf_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    )
    return model.eval()


def _hf_logits(hf_model, x):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(x["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(x["padding_mask"], dtype=torch.long),
        )
    return out.logits.numpy()


def _keras_logits(lm, x):
    return np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)))


def _randomize_b(model, seed=0, scale=0.5):
    """Non-zero B (and router) values, so adapters change the outputs."""
    rng = np.random.default_rng(seed)
    state = keras_relora.get_state(model)
    for adapter in state.adapters.values():
        for variable in adapter.weights:
            if "b_kernel" in variable.path or "router" in variable.path:
                variable.assign(
                    rng.normal(0, scale, variable.shape).astype("float32")
                )


# --- 1. No export path drops adapters -----------------------------------


@pytest.mark.parametrize("where", ["task", "task_backbone", "backbone"])
def test_export_to_transformers_refuses_adapted_models(tmp_path, where):
    lm = _causal_lm()
    model = lm.backbone if where == "backbone" else lm
    model.enable_relora(rank=2, experts=1)
    target = lm.backbone if where == "task_backbone" else model
    folder = tmp_path / "hf"
    with pytest.raises(ValueError, match=r"merge_relora\(model\)\."
                       r"export_to_transformers.*save_peft"):
        target.export_to_transformers(str(folder))
    assert not folder.exists()
    # unload gives the exporter back.
    keras_relora.unload(model)
    target.export_to_transformers(str(folder))
    assert (folder / "config.json").exists()


# --- 2. Merged export: a plain transformers folder ----------------------


@pytest.mark.parametrize("experts", [1, 2])
def test_merged_export_loads_in_transformers(tmp_path, capsys, experts):
    lm = _causal_lm()
    lm.enable_relora(rank=2, experts=experts)
    _randomize_b(lm)
    x = tm.token_batch()
    live = _keras_logits(lm, x)
    calibration = x if experts > 1 else None
    merged = keras_relora.merge_relora(lm, calibration)
    if experts > 1:  # The mean-gate error is measured and printed.
        assert "merge_relora (mean gates): output error" in (
            capsys.readouterr().out
        )
    else:
        np.testing.assert_allclose(
            _keras_logits(merged, x), live, atol=1e-5, rtol=1e-5
        )
    merged.export_to_transformers(str(tmp_path / "hf"))
    hf = _hf_model(tmp_path / "hf")
    expected = _keras_logits(merged, x)
    assert np.abs(expected - _keras_logits(_causal_lm(), x)).max() > 1e-3
    np.testing.assert_allclose(_hf_logits(hf, x), expected, atol=1e-4)
