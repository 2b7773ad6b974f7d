"""More inputs a hostile user would try: nothing silently wrong.

PEFT folders that would load with another forward pass or crash the
header parser, saves interrupted half-way, settings that ask for huge
allocations, quantization and Keras's own LoRA mixed with the adapters.
Each refusal is checked by type and message, with the model bitwise
unchanged. Tiny models; runs on the three backends.
"""

import json
import os
import struct

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora
from keras_relora import _atomic_writes
from keras_relora.saving import adapter_file

pytest.importorskip("safetensors")


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _lm():
    keras.utils.set_random_seed(0)
    return tm.llama3_causal_lm()


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """A good PEFT folder (q, v adapters of a tiny Llama 3)."""
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    lm = _lm()
    lm.enable_relora(rank=2, experts=1, share_a="layer", targets=["q", "v"])
    tm.randomize_adapters(lm)
    keras_relora.save_peft(lm, folder)
    return folder


def _copy(folder, tmp_path, config=None, weights=None):
    """A copy of `folder` with its config changed by `config(dict)` or its
    weights file replaced by the bytes `weights`."""
    target = tmp_path / "changed"
    target.mkdir()
    with open(folder / "adapter_config.json") as f:
        content = json.load(f)
    if config is not None:
        content = config(content)
    with open(target / "adapter_config.json", "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    data = (folder / "adapter_model.safetensors").read_bytes()
    (target / "adapter_model.safetensors").write_bytes(
        data if weights is None else weights(data)
    )
    return target


def _refused(folder, match):
    lm = _lm()
    before = tm.snapshot(lm)
    with pytest.raises(ValueError, match=match):
        keras_relora.load_peft(lm, folder)
    assert keras_relora.get_state(lm) is None
    tm.assert_unchanged(lm, before)


def _set(**fields):
    def change(config):
        config.update(fields)
        return config

    return change


# Folders whose forward pass differs from plain LoRA.


def test_good_peft_folder_loads(peft_folder):
    lm = _lm()
    keras_relora.load_peft(lm, peft_folder)
    assert len(keras_relora.get_state(lm).adapters) == 4


@pytest.mark.parametrize(
    "init", ["pissa", "pissa_niter_4", "olora", "corda", "eva", "loftq"]
)
def test_load_peft_refuses_inits_that_change_the_base(
    peft_folder, tmp_path, init
):
    folder = _copy(peft_folder, tmp_path, _set(init_lora_weights=init))
    _refused(
        folder,
        rf"adapter_config\.json.*init_lora_weights='{init}'.*residual"
        r"(.|\n)*plain LoRA",
    )


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_load_peft_accepts_plain_inits(peft_folder, tmp_path, init):
    folder = _copy(peft_folder, tmp_path, _set(init_lora_weights=init))
    keras_relora.load_peft(_lm(), folder)


def test_load_peft_refuses_alora(peft_folder, tmp_path):
    folder = _copy(
        peft_folder, tmp_path, _set(alora_invocation_tokens=[5, 6, 7])
    )
    _refused(
        folder,
        r"adapter_config\.json.*`alora_invocation_tokens`.*plain LoRA",
    )


def test_load_peft_refuses_tensors_outside_target_modules(
    peft_folder, tmp_path
):
    folder = _copy(peft_folder, tmp_path, _set(target_modules=["q_proj"]))
    _refused(
        folder,
        r"adapter_model\.safetensors.*`target_modules` \['q_proj'\].*"
        r"adapter_config\.json.*does not match.*v_proj",
    )


def test_load_peft_refuses_targets_without_tensors(peft_folder, tmp_path):
    folder = _copy(
        peft_folder,
        tmp_path,
        _set(target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    _refused(
        folder,
        r"`target_modules` entries of .*adapter_config\.json.* no tensor in "
        r".*adapter_model\.safetensors.*\['down_proj'\]",
    )


def test_load_peft_refuses_a_regex_target_that_misses(peft_folder, tmp_path):
    folder = _copy(peft_folder, tmp_path, _set(target_modules=r".*\.q_proj"))
    _refused(folder, r"does not match.*model\.layers\.0\.self_attn\.v_proj")


# The safetensors header and the config, forged.


def _header(data):
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _with_header(header, rest):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + rest


def _non_dict_entry(data):
    header, rest = _header(data)
    key = next(k for k in header if k != "__metadata__")
    header[key] = [1, 2]
    return _with_header(header, rest)


@pytest.mark.parametrize(
    "forge",
    [
        lambda d: struct.pack("<Q", 2**62) + d[8:],  # MemoryError before
        lambda d: struct.pack("<Q", len(d) + 100) + d[8:],  # Unicode...
        lambda d: b"",  # JSONDecodeError before
        lambda d: d[:-7],  # truncated tensor data
        _non_dict_entry,  # AttributeError before
    ],
    ids=["huge_length", "length_past_end", "empty", "truncated", "entry"],
)
def test_load_peft_refuses_forged_safetensors(peft_folder, tmp_path, forge):
    folder = _copy(peft_folder, tmp_path, weights=forge)
    _refused(
        folder,
        r"adapter_model\.safetensors' is not a valid PEFT adapter file: "
        r"safetensors could not read it.*save_pretrained",
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: "", r"it is not JSON"),
        (lambda c: "{not json", r"it is not JSON"),
        (lambda c: [c], r"JSON list, not an object"),
        (lambda c: {k: v for k, v in c.items() if k != "r"}, r"`r`.*r=None"),
        (_set(r=0), r"`r` must be a positive int.*r=0"),
        (_set(r=2.5), r"`r` must be a positive int.*r=2\.5"),
        (_set(r=True), r"`r` must be a positive int.*r=True"),
        (_set(lora_alpha=None), r"`lora_alpha`.*lora_alpha=None"),
        (_set(lora_alpha="16"), r"`lora_alpha`.*lora_alpha='16'"),
        (_set(lora_dropout=2), r"`lora_dropout`.*lora_dropout=2"),
        (_set(use_rslora="yes"), r"`use_rslora`.*use_rslora='yes'"),
        (_set(target_modules=5), r"`target_modules`.*target_modules=5"),
    ],
    ids=[
        "empty",
        "not_json",
        "list",
        "no_r",
        "r0",
        "r_float",
        "r_bool",
        "alpha_null",
        "alpha_str",
        "dropout",
        "rslora",
        "targets",
    ],
)
def test_load_peft_refuses_invalid_configs(
    peft_folder, tmp_path, change, field
):
    folder = _copy(peft_folder, tmp_path, config=change)
    _refused(
        folder,
        r"adapter_config\.json' is not a valid PEFT adapter file: .*"
        + field
        + r"(.|\n)*save_peft",
    )


# A write that fails half-way, in this process, leaves the previous good
# file or folder as it was (for killed processes see
# tests/integration/test_atomic_saves.py).


def _fail_after_partial_write(monkeypatch, module, name):
    original = getattr(module, name)

    def partial_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(module, name, partial_then_fail)


def test_save_peft_failing_half_way_keeps_the_previous_folder(
    tmp_path, monkeypatch
):
    lm = _lm()
    lm.enable_relora(rank=2, experts=1, share_a="layer", targets=["q", "v"])
    tm.randomize_adapters(lm, seed=1)
    folder = tmp_path / "adapter"
    keras_relora.save_peft(lm, folder)
    (folder / "README.md").write_text("mine")
    good = {p.name: p.read_bytes() for p in folder.iterdir()}
    tm.randomize_adapters(lm, seed=2)
    _fail_after_partial_write(monkeypatch, json, "dump")  # weights written
    with pytest.raises(OSError, match="disk full"):
        keras_relora.save_peft(lm, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == good
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # No leftover.
    keras_relora.save_peft(lm, folder)  # A complete save replaces it.
    assert (folder / "README.md").read_text() == "mine"
    new = _lm()
    keras_relora.load_peft(new, folder)
    np.testing.assert_allclose(
        to_numpy(new(tm.token_batch())),
        to_numpy(lm(tm.token_batch())),
        atol=1e-5,
    )


@pytest.mark.parametrize("kind", ["keras", "weights", "adapters"])
def test_saves_failing_half_way_keep_the_previous_file(
    tmp_path, monkeypatch, kind
):
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    model.enable_relora(rank=2, experts=2)
    tm.randomize_adapters(model, seed=1)
    path = (
        tmp_path
        / {
            "keras": "m.keras",
            "weights": "m.weights.h5",
            "adapters": "m.safetensors",
        }[kind]
    )
    save = {
        "keras": model.save,
        "weights": model.save_weights,
        "adapters": model.save_relora_weights,
    }[kind]
    save(path)
    good = path.read_bytes()
    tm.randomize_adapters(model, seed=2)
    if kind == "adapters":
        _fail_after_partial_write(monkeypatch, _atomic_writes, "_fsync")
    else:  # The manifest or the zip is written, then the failure.
        from keras_relora.adapt import model_class

        _fail_after_partial_write(monkeypatch, model_class, "write_manifest")
        if kind == "keras":
            _fail_after_partial_write(monkeypatch, _atomic_writes, "_fsync")
    with pytest.raises(OSError, match="disk full"):
        save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == [path.name]


# An empty `targets` pattern would adapt every layer.


@pytest.mark.parametrize("targets", ["", "  ", ["q", ""]])
def test_enable_relora_refuses_empty_targets(targets):
    x, _ = tm.dense_data()
    model = tm.functional_model()
    model(x)
    before = tm.snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"`targets` must not be empty.*"
        r"every layer.*targets='\.\*'",
    ):
        model.enable_relora(rank=2, experts=2, targets=targets)
    assert keras_relora.get_state(model) is None
    tm.assert_unchanged(model, before)
    assert all(v.trainable for v in model.weights)


# A forged adapter file is refused before anything is allocated.


def _adapter_file(tmp_path, change):
    """An adapter file of a tiny Llama 3 whose `relora` description (and
    digest) is rewritten by `change(relora)`; a forged file carries a
    valid digest, which is no signature."""
    lm = _lm()
    lm.enable_relora(rank=2, experts=2, targets=["q", "v"])
    path = tmp_path / "a.safetensors"
    lm.save_relora_weights(path)
    relora, base, tensors = adapter_file.read(path)
    relora = change(relora)
    adapter_file.write(path, tensors, relora=relora, base=base)
    return path


def _settings(**fields):
    def change(relora):
        relora["settings"].update(fields)
        return relora

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_settings(rank=10000), r"rank=10000, but shared_a/.* shape"),
        (
            _settings(experts=1000000),
            r"experts=1000000, rank=2, but adapters/.*b_kernel has shape "
            r"\(2, 2, \d+\)",
        ),
        (
            lambda r: {k: v for k, v in r.items() if k != "settings"},
            r"no `settings` object",
        ),
        (lambda r: {**r, "settings": [1]}, r"no `settings` object"),
        (_settings(rank="2"), r"out of range.*`rank`.*rank='2'"),
        (_settings(experts=0), r"out of range.*`experts`.*experts=0"),
        (_settings(alpha=-1.0), r"out of range.*`alpha`.*alpha=-1\.0"),
        (_settings(targets="q"), r"`targets`.*lists of layer paths"),
        (
            lambda r: {
                **r,
                "settings": {
                    k: v for k, v in r["settings"].items() if k != "rank"
                },
            },
            r"settings have no `rank`",
        ),
    ],
    ids=[
        "rank",
        "experts",
        "no_settings",
        "settings_list",
        "rank_str",
        "experts0",
        "alpha",
        "targets",
        "no_rank",
    ],
)
@pytest.mark.parametrize("adapted", [False, True])
def test_load_relora_weights_refuses_forged_settings_before_allocating(
    tmp_path, monkeypatch, change, match, adapted
):
    path = _adapter_file(tmp_path, change)
    lm = _lm()
    if adapted:
        lm.enable_relora(rank=2, experts=2, targets=["q", "v"])
    before = tm.snapshot(lm)
    from keras_relora.saving import checkpoint

    def no_allocation(*args, **kwargs):
        raise AssertionError("adapters were allocated")

    monkeypatch.setattr(checkpoint, "enable_from_config", no_allocation)
    with pytest.raises(
        ValueError,
        match=r"a\.safetensors' is not a valid keras_relora adapter file: .*"
        + match
        + r"(.|\n)*save_relora_weights",
    ):
        lm.load_relora_weights(path)
    assert (keras_relora.get_state(lm) is None) is not adapted
    tm.assert_unchanged(lm, before)


def test_load_relora_weights_refuses_settings_larger_than_the_model(
    tmp_path,
):
    # Every adapter pruned: no B tensor tells the experts; the size
    # check against the model refuses before enabling.
    def change(relora):
        relora["pruned"] = list(relora["settings"]["targets"])
        relora["settings"]["experts"] = 1000000
        return relora

    path = _adapter_file(tmp_path, change)
    lm = _lm()
    before = tm.snapshot(lm)
    with pytest.raises(
        ValueError,
        match=r"experts=1000000 ask for \d+ adapter parameters, more than "
        r"the model can hold",
    ):
        lm.load_relora_weights(path)
    assert keras_relora.get_state(lm) is None
    tm.assert_unchanged(lm, before)


# `quantize` after `enable_relora` would leave the adapted layers'
# base in float; quantizing first, then adapting, works.


@pytest.mark.parametrize("where", ["task", "backbone"])
def test_quantize_after_enable_relora_refuses(where):
    lm = _lm()
    lm.enable_relora(rank=2, experts=2)
    model = lm if where == "task" else lm.backbone
    before = tm.snapshot(lm)
    with pytest.raises(
        ValueError,
        match=r"Cannot quantize .* after `enable_relora`.*float.*Quantize "
        r"first.*unload.*quantize\(mode\).*enable_relora.*mode='int8'",
    ):
        model.quantize("int8")
    adapter = next(iter(keras_relora.get_state(lm).adapters.values()))
    with pytest.raises(ValueError, match=r"Cannot quantize.*Quantize first"):
        adapter._base_layer.quantize("int8")
    tm.assert_unchanged(lm, before)
    assert all(
        a._base_layer.dtype_policy.quantization_mode is None
        for a in keras_relora.get_state(lm).adapters.values()
    )
    # `unload` undoes the refusal: the order that works.
    keras_relora.unload(lm)
    tm.quantize(lm, "int8")
    lm.enable_relora(rank=2, experts=2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_trains_adapters_only(mode):
    lm = _lm()
    tm.quantize(lm, mode)
    lm.enable_relora(rank=2, experts=2, targets=["q", "v", "up", "down"])
    state = keras_relora.get_state(lm)
    assert all(
        a._base_layer.dtype_policy.quantization_mode == mode
        for a in state.adapters.values()
    )
    adapter_paths = set(state.variables())
    before = tm.snapshot(lm)
    x, y, _ = tm.lm_data()
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=keras.config.backend() == "tensorflow",
    )
    lm.fit(x, y, batch_size=4, epochs=2, verbose=0)
    after = tm.snapshot(lm)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and changed <= adapter_paths
    tm.assert_unchanged(lm, before, ignore=adapter_paths)


def test_int8_reversible_embedding_is_refused():
    lm = _lm()
    lm.quantize("int8")  # The token embedding (the tied head) too.
    before = tm.snapshot(lm)
    with pytest.raises(
        ValueError,
        match=r"Cannot enable ReLoRA on .*'token_embedding' is a "
        r"`ReversibleEmbedding` quantized to int8.*no gradient.*"
        r"filters=lambda layer: not isinstance\(layer, "
        r"keras.layers.ReversibleEmbedding\)",
    ):
        lm.enable_relora(rank=2, experts=2)
    assert keras_relora.get_state(lm) is None
    tm.assert_unchanged(lm, before)
    assert all(v.trainable for v in lm.trainable_weights)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_reversible_embedding_input_gradient_in_reverse(mode):
    # The premise of the refusal above: measured against the layer's own
    # dequantized map, Keras's int8 reverse call gives its inputs a wrong
    # gradient and int4's is right. If a Keras release fixes int8, this
    # test fails: lift the refusal then.
    rng = np.random.default_rng(0)
    layer = keras.layers.ReversibleEmbedding(32, 8)
    layer.build((None,))
    layer.embeddings.assign(rng.normal(size=(32, 8)).astype("float32"))
    layer.quantize(mode)
    x = rng.normal(size=(3, 8)).astype("float32")
    weights = rng.normal(size=(3, 32)).astype("float32")

    def weighted_logits(v):
        return layer(v, reverse=True) * keras.ops.convert_to_tensor(weights)

    got = tm.input_gradient(weighted_logits, x)
    # The reverse call is linear in one-hot rows (their int8 rounding is
    # exact): its matrix, row by row.
    matrix = keras.ops.convert_to_numpy(
        layer(np.eye(8, dtype="float32"), reverse=True)
    )
    expected = weights @ matrix.T
    error = np.abs(got - expected).max() / np.abs(expected).max()
    if mode == "int8":
        assert error > 0.5
    else:
        assert error < 1e-5


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_reports_the_float_parameter_count(mode):
    # An int4 kernel stores two values per byte (about half its float
    # shape) and quantizing adds scales: the report counts the float
    # model's parameters, as a float base's report does.
    float_report = _lm().enable_relora(rank=2, experts=2)
    lm = _lm()
    tm.quantize(lm, mode)
    stored = sum(int(np.prod(v.shape)) for v in lm.weights)
    assert stored != float_report.base_params
    got = lm.enable_relora(rank=2, experts=2)
    assert got.base_params == float_report.base_params
    assert got.total_params == float_report.total_params
    assert got.trainable_params == float_report.trainable_params
    assert got.trainable_percent == float_report.trainable_percent


# Keras's own LoRA and `enable_relora` on one model.


@pytest.mark.parametrize("how", ["backbone", "layer"])
def test_enable_relora_refuses_a_model_with_keras_lora(how):
    lm = _lm()
    if how == "backbone":
        lm.backbone.enable_lora(2)
    else:
        lm.backbone.get_layer(
            "transformer_layer_0"
        )._self_attention_layer._query_dense.enable_lora(2)
    before = tm.snapshot(lm)
    trainable = [v.trainable for v in lm.weights]
    with pytest.raises(
        ValueError,
        match=r"Keras's own LoRA enabled on layers \[.*query.*\].*"
        r"`enable_lora`.*`enable_relora` cannot be combined.*VARIANTS",
    ):
        lm.enable_relora(rank=2, experts=1)
    assert keras_relora.get_state(lm) is None
    tm.assert_unchanged(lm, before)
    assert [v.trainable for v in lm.weights] == trainable


@pytest.mark.parametrize("how", ["backbone", "target", "other"])
def test_keras_enable_lora_after_enable_relora_refuses(how):
    lm = _lm()
    lm.enable_relora(rank=2, experts=1, targets=["q", "v"])
    attention = lm.backbone.get_layer(
        "transformer_layer_0"
    )._self_attention_layer
    call = {
        "backbone": lambda: lm.backbone.enable_lora(2),
        "target": lambda: attention._query_dense.enable_lora(2),
        "other": lambda: attention._key_dense.enable_lora(2),
    }[how]
    before = tm.snapshot(lm)
    trainable = [v.trainable for v in lm.weights]
    with pytest.raises(
        ValueError,
        match=r"Cannot call Keras's `enable_lora`.*`enable_relora`.*cannot "
        r"be combined.*unload",
    ):
        call()
    tm.assert_unchanged(lm, before)
    assert [v.trainable for v in lm.weights] == trainable
    assert not any(
        getattr(layer, "lora_enabled", False)
        for layer in lm.backbone._flatten_layers()
    )
    # `unload` gives Keras's `enable_lora` back.
    keras_relora.unload(lm)
    lm.backbone.enable_lora(2)
    assert attention._query_dense.lora_enabled
