"""Smoke tests of the fine-tuning benchmarks' `--quick` modes.

Each script runs in a subprocess on this process's backend, as a user runs
it, with `--no-append` (RESULTS.md is left alone) and a temporary output
folder. They check that the pipeline runs end to end and writes sane
results; they assert nothing about which variant wins.

The end-to-end runs load real weights (MiniLM-L6, SmolLM2-135M) and train
several variants, which costs minutes on a 2-core machine, so each script
runs on one backend, a different one each (commonsense on JAX, MiniLM on
TensorFlow, drop ratio on torch): every backend runs one real-model
pipeline, and CI pays for each script once. The library itself is tested
on every backend by the other test files. The helper tests at the bottom
run everywhere.
"""

import json
import os

import keras
import numpy as np
import pytest
from benchmark_scripts import benchmark_module
from benchmark_scripts import needs_assets
from benchmark_scripts import needs_smollm2
from benchmark_scripts import run_script
from benchmark_scripts import smoke_backend


def check_result(result, tasks):
    assert set(result["accuracy"]) == set(tasks)
    for value in result["accuracy"].values():
        assert 0.0 <= value <= 1.0
    assert result["average"] == pytest.approx(
        np.mean(list(result["accuracy"].values()))
    )
    assert result["peak_rss_mb"] > 100


@needs_assets
@smoke_backend("tensorflow")
def test_minilm_tasks_quick(tmp_path):
    stdout = run_script(
        "minilm_tasks.py",
        tmp_path,
        "--only",
        "head_only,lora,relora_multi+reducer",
    )
    with open(tmp_path / "minilm_tasks.json") as f:
        payload = json.load(f)
    rows = [r["row"] for r in payload["results"]]
    assert rows == ["head_only", "lora", "relora_multi+reducer"]
    tasks = payload["settings"]["tasks"]
    for result in payload["results"]:
        check_result(result, tasks)
    by_row = {r["row"]: r for r in payload["results"]}
    assert by_row["head_only"]["adapter_params"] == 0
    # 4 experts per layer hold more B parameters than one.
    assert (
        by_row["relora_multi+reducer"]["adapter_params"]
        > by_row["lora"]["adapter_params"]
    )
    assert len(by_row["relora_multi+reducer"]["importance"]) == 6
    assert "| relora_multi+reducer |" in stdout


@needs_assets
@smoke_backend("torch")
@pytest.mark.parametrize(
    # SmolLM2's drop curves run in test_paper_claims_quick (Figure 5 there
    # is drop_ratio's code on SmolLM2).
    "model, blocks, dropped",
    [("minilm", 6, [2, 3, 5])],
)
def test_drop_ratio_quick(tmp_path, model, blocks, dropped):
    run_script(
        "drop_ratio.py", tmp_path, "--random-seeds", "1", "--model", model
    )
    with open(tmp_path / f"drop_ratio_{model}.json") as f:
        payload = json.load(f)
    (run,) = payload["runs"]
    assert run["num_blocks"] == blocks
    assert len(run["trained"]["importance"]) == blocks
    assert len(run["points"]) == 3 * 2  # 3 ratios, importance + 1 random
    # round(ratio * blocks) of the least important blocks at 25/50/75%.
    assert [len(p["blocks"]) for p in run["points"][::2]] == dropped
    order = list(np.argsort(run["trained"]["importance"], kind="stable"))
    for point in run["points"][::2]:
        assert point["blocks"] == sorted(order[: len(point["blocks"])])
    check = run["prune_check"]
    # The real `prune` picks the same blocks and gives the same logits as
    # setting their B kernels to zero.
    assert check["same_blocks"]
    assert check["max_abs_logit_difference"] < 1e-3


@needs_assets
@smoke_backend("jax")
@needs_smollm2
def test_commonsense_quick(tmp_path):
    stdout = run_script(
        "commonsense.py", tmp_path, "--only", "lora,relora_multi+reducer"
    )
    with open(tmp_path / "commonsense.json") as f:
        payload = json.load(f)
    rows = [r["row"] for r in payload["results"]]
    assert rows == ["base (zero-shot)", "lora", "relora_multi+reducer"]
    tasks = payload["settings"]["tasks"]
    assert tasks == ["sst2", "arc_easy"]  # the main job's default tasks
    for result in payload["results"]:
        check_result(result, tasks)
        # OLMo's evaluator: per-document results behind each accuracy.
        for task in tasks:
            correct = result["documents"][task]["correct"]
            assert len(correct) == payload["test_sizes"][task] == 3
            assert result["accuracy"][task] == pytest.approx(np.mean(correct))
            # (The quick run keeps 4 of 30 blocks: far from a good LM.)
            assert 0.0 < result["ce_loss"][task] < np.inf
    blocks = payload["settings"]["blocks"]  # the quick run's first blocks
    assert len(payload["results"][-1]["importance"]) == blocks
    # Paired bootstrap against the lora row, over the 6 pooled documents.
    versus = {c["row"]: c for c in payload["vs_lora"]}
    assert set(versus) == {"base (zero-shot)", "relora_multi+reducer"}
    for row, c in versus.items():
        by_row = {r["row"]: r for r in payload["results"]}
        assert c["documents"] == 6
        assert c["change"] == pytest.approx(
            by_row[row]["average"] - by_row["lora"]["average"]
        )
        assert c["low"] <= c["change"] <= c["high"]
    assert "acc change vs lora" in stdout


# -- helpers (every backend, seconds) -----------------------------------------


def test_blocks_to_drop_matches_prune():
    import keras_relora

    drop_ratio = benchmark_module("drop_ratio")
    importance = np.array([0.3, -0.2, 0.1, -0.5, 0.0, 0.4])
    for ratio, strategy, seed in [
        (0.25, "importance", None),
        (0.5, "importance", None),
        (0.75, "importance", None),
        (0.5, "random", 3),
        (0.25, "random", 0),
    ]:
        inputs = keras.Input((4,))
        h = inputs
        for i in range(6):
            h = keras.layers.Dense(4, name=f"block_{i}")(h)
        model = keras.Model(inputs, h)
        model.enable_relora(rank=2, experts=2)
        expected = keras_relora.prune(
            model, ratio, importance=importance, strategy=strategy, seed=seed
        )
        assert (
            drop_ratio.blocks_to_drop(6, ratio, strategy, importance, seed)
            == expected
        )


def test_summary_table_and_append(tmp_path):
    finetune = benchmark_module("finetune")
    results = [
        {
            "row": "a",
            "seed": s,
            "accuracy": {"x": acc, "y": 0.5},
            "average": (acc + 0.5) / 2,
            "adapter_params": 100,
            "adapter_percent": 1.0,
            "train_seconds": 3.0,
            "peak_rss_mb": 10.0,
        }
        for s, acc in ((0, 0.6), (1, 0.8))
    ]
    table, by_row = finetune.summary_table(results, ["x", "y"])
    assert list(by_row) == ["a"]
    # mean ± sample std over the two seeds
    assert "| a | 70.0 ± 14.1 | 50.0 ± 0.0 | 60.0 ± 7.1 | 55.0..65.0 |" in (
        table
    )
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Other\n\nkept")
    finetune.append_section("## Mine\n\n" + table, path=str(path))
    text = path.read_text()
    assert text.startswith("# Results\n\n## Other\n\nkept\n")
    assert text.rstrip().endswith(table.splitlines()[-1])


def test_common_flags_fill_each_scripts_sizes_and_seeds():
    commonsense = benchmark_module("commonsense")
    minilm_tasks = benchmark_module("minilm_tasks")
    drop_ratio = benchmark_module("drop_ratio")
    full = commonsense.parse_args([])
    assert (full.steps, full.test_per_task, full.seeds) == (40, 100, [0])
    assert full.tasks == ["sst2", "arc_easy"]
    assert full.output_dir == os.path.join("benchmarks", "results")
    quick = commonsense.parse_args(["--quick", "--steps", "3"])
    assert (quick.steps, quick.blocks, quick.seeds) == (3, 4, [0])
    assert quick.output_dir == os.path.join("outputs", "benchmarks", "quick")
    assert minilm_tasks.parse_args([]).seeds == [0, 1]
    assert minilm_tasks.parse_args(["--quick"]).seeds == [0]
    # drop_ratio takes the sizes and tasks of the model it runs.
    smollm2 = drop_ratio.parse_args(["--model", "smollm2", "--seeds", "2,3"])
    assert smollm2.blocks == 30 and smollm2.tasks == full.tasks
    assert smollm2.seeds == [2, 3] and smollm2.random_seeds == 5
    minilm = drop_ratio.parse_args(["--quick"])
    assert minilm.model == "minilm" and minilm.tasks == list(minilm_tasks.TASKS)
    assert minilm.random_seeds == 2


def test_commonsense_report_names_the_run_size():
    commonsense = benchmark_module("commonsense")
    assert commonsense.run_mode(commonsense.parse_args([])) == (
        "full run (default sizes)"
    )
    assert (
        commonsense.run_mode(commonsense.parse_args(["--steps", "16"]))
        == "reduced-size run"
    )
    assert (
        commonsense.run_mode(commonsense.parse_args(["--quick"]))
        == "QUICK smoke run"
    )


def test_load_runs_merges_into_a_new_file(tmp_path):
    finetune = benchmark_module("finetune")
    commonsense = benchmark_module("commonsense")
    settings = dict(vars(commonsense.parse_args(["--only", "lora"])))

    def run(rows, seed, seconds, command):
        return {
            "settings": dict(settings),
            "complete": True,
            "total_seconds": seconds,
            "command": command,
            "environment": {"loadavg_start": seconds / 10, "commit": command},
            "results": [{"row": r, "seed": seed} for r in rows],
        }

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(run(["relora_multi", "lora"], 0, 10.0, "x")))
    second.write_text(
        json.dumps(run(["base (zero-shot)", "lora"], 1, 5.0, "y"))
    )
    inputs = {p: p.read_bytes() for p in (first, second)}
    payload, path = finetune.load_runs(
        f"{first},{second}", commonsense.merge_runs
    )
    # The inputs are never written (a run may still be writing them).
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert path == str(tmp_path / "merged_a.json")
    assert [(r["row"], r["seed"]) for r in payload["results"]] == [
        ("base (zero-shot)", 1),
        ("lora", 0),
        ("lora", 1),
        ("relora_multi", 0),
    ]
    assert payload["settings"]["seeds"] == [0, 1]
    assert payload["total_seconds"] == 15.0
    assert payload["command"] == "x`; `y"
    assert payload["environment"]["loadavg_start"] == [1.0, 0.5]
    assert payload["environment"]["commit"] == ["x", "y"]
    assert json.loads((tmp_path / "merged_a.json").read_text()) == payload
    # An explicit output path, but never an input file.
    out = tmp_path / "out" / "all.json"
    out.parent.mkdir()
    assert finetune.load_runs(
        f"{first},{second}", commonsense.merge_runs, str(out)
    )[1] == str(out)
    assert json.loads(out.read_text())["total_seconds"] == 15.0
    with pytest.raises(ValueError, match="would overwrite an input file"):
        finetune.load_runs(
            f"{first},{second}", commonsense.merge_runs, str(second)
        )
    assert {p: p.read_bytes() for p in inputs} == inputs
    # Runs of other sizes do not merge into one table.
    other = run(["lora"], 2, 1.0, "z")
    other["settings"]["steps"] = 7
    second.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="The runs differ in steps"):
        finetune.load_runs(f"{first},{second}", commonsense.merge_runs)
