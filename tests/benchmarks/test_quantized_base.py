"""`benchmarks/quantized_base.py` and the main job's `--quantize`: the
weight count, the table, the argument checks and a tiny run per base."""

import json
import os
import re
import subprocess
import sys

import keras
import pytest
from benchmark_scripts import BENCHMARKS
from benchmark_scripts import ROOT
from benchmark_scripts import benchmark_module
from benchmark_scripts import smoke_backend

from relora_offline import main_job


@pytest.fixture(scope="module")
def quantized():
    return benchmark_module("quantized_base")


@pytest.mark.parametrize(
    "mode, expected",
    [
        # kernel 8 x 4 float32 (128 B) + bias 4 float32 (16 B).
        (None, 144),
        # kernel 8 x 4 int8 (32) + per-column scale (16) + bias (16).
        ("int8", 64),
        # kernel packed two values a byte, 8 x 2 int8 (16) + scale 1 x 4
        # float32 (16) + zero point 1 x 4 int8 (4) + g_idx 8 float32 (32)
        # + bias (16).
        ("int4", 84),
    ],
)
def test_weight_bytes_counts_stored_bytes(mode, expected):
    dense = keras.layers.Dense(4)
    dense.build((None, 8))
    if mode:
        dense.quantize(mode)
    assert main_job.weight_bytes(dense) == expected


def test_arguments_split_at_the_double_dash(quantized):
    args = quantized.parse_args(["--bases", "float,int4", "--", "--tiny"])
    assert args.bases == ["float", "int4"]
    assert args.passthrough == ["--tiny"]
    argv = quantized.main_job_argv("int4", args)
    assert argv[1].endswith(os.path.join("examples", "llama3_commonsense.py"))
    assert argv[2:] == [
        "--output-dir",
        os.path.join(args.output_dir, "int4"),
        "--quantize",
        "int4",
        "--tiny",
    ]
    argv = quantized.main_job_argv("float", quantized.parse_args([]))
    assert "--quantize" not in argv and argv[2:4] == ["--model", "smollm2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bases", "int2"], r"--bases takes float, int8, int4\. Received: "),
        (["--bases", ","], r"Received: \(none\)"),
        (["--model", "gemma3", "--", "--tiny"], "--tiny picks its own model"),
    ],
)
def test_bad_arguments_say_what_to_pass(quantized, capsys, argv, message):
    with pytest.raises(SystemExit):
        quantized.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_table_rows_from_results(quantized):
    def results(weights, start, peak, step, before, after):
        return {
            "weights_mib": weights,
            "rss_fit_start_mib": start,
            "rss_fit_peak_mib": peak,
            "median_step_s": step,
            "accuracy_before": {"all": before},
            "accuracy_after": {"all": after},
            "change": [after - before, after - before - 0.05, 0.3],
            "num_test": {"all": 400},
            "steps": 60,
        }

    rows = [
        quantized.row_of("float", results(520.0, 1000, 3000, 2.0, 0.5, 0.7), 1),
        quantized.row_of("int8", results(160.25, 900, 2400, 2.5, 0.5, 0.6), 1),
    ]
    assert rows[1]["fit_growth_mib"] == 1500
    lines = quantized.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == (
        "| float | 520.0 | 1,000 | 3,000 | 2,000 | 2,000 | 50.0% | 70.0% | "
        "+20.0 [+15.0, +30.0] |"
    )
    assert lines[3] == (
        "| int8 | 160.2 | 900 | 2,400 | 1,500 | 2,500 (1.25x) | 50.0% | "
        "60.0% | +10.0 [+5.0, +30.0] |"
    )


# The benchmark's smoke run on one backend: quantized bases train on every
# backend in tests/unit (int8 and int4); this run on JAX took ~240 s.
@smoke_backend("torch")
def test_tiny_main_job_on_float_and_int4_bases(tmp_path):
    process = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCHMARKS, "quantized_base.py"),
            "--bases",
            "float,int4",
            "--threads",
            "1",
            "--no-append",
            "--output-dir",
            str(tmp_path),
            "--",
            "--tiny",
        ],
        cwd=ROOT,
        env=dict(os.environ, KERAS_BACKEND=keras.config.backend()),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr
    with open(tmp_path / "quantized_base.json") as f:
        rows = {r["base"]: r for r in json.load(f)["rows"]}
    assert set(rows) == {"float", "int4"}
    # The int4 base stores its kernels in fewer bytes (the tiny model's
    # float embedding and adapters are most of it).
    assert rows["int4"]["weights_mib"] < rows["float"]["weights_mib"]
    for row in rows.values():
        assert row["median_step_s"] > 0
        assert 0 <= row["accuracy_before"] <= 1
        assert 0 <= row["accuracy_after"] <= 1
        assert row["steps"] >= 1
    # The quantized run skipped the merge and did not count it a failure.
    with open(tmp_path / "int4" / "results.json") as f:
        results = json.load(f)
    assert results["failures"] == []
    assert results["merge_error"] == {"skipped": "int4 base"}
    assert results["settings"]["quantize"] == "int4"
