"""`benchmarks/paper_claims.py`: its statistics, its verdicts, a quick run.

The statistics are checked against independent references (scipy's
Spearman and Student-t quantile, the analytic standard error of a mean);
the verdicts on planted differences; the quick run (torch only: it trains
real SmolLM2 blocks, minutes on 2 cores) end to end, with its numbers
re-derived from the per-document results it saved.
"""

import json

import numpy as np
import pytest
from benchmark_scripts import benchmark_module
from benchmark_scripts import needs_assets
from benchmark_scripts import needs_smollm2
from benchmark_scripts import run_script
from benchmark_scripts import smoke_backend

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.fixture(scope="module")
def claims():
    return benchmark_module("paper_claims")


def test_two_level_bootstrap_one_seed_matches_the_standard_error(claims):
    rng = np.random.default_rng(0)
    diff = rng.normal(0.3, 1.0, size=(1, 400))
    value, low, high = claims.two_level_bootstrap(diff, num_resamples=4000)
    assert value == pytest.approx(diff.mean())
    se = diff.std(ddof=1) / np.sqrt(diff.shape[1])
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert low < value < high


def test_two_level_bootstrap_resamples_seeds_and_weights_tokens(claims):
    # Documents identical within a seed: all spread comes from the seeds.
    diff = np.repeat(np.array([[0.0], [1.0], [2.0]]), 50, axis=1)
    value, low, high = claims.two_level_bootstrap(diff)
    assert value == pytest.approx(1.0)
    assert 0.0 <= low < 1.0 < high <= 2.0
    # Constant differences: no spread at all.
    value, low, high = claims.two_level_bootstrap(np.full((3, 20), 0.25))
    assert value == low == high == pytest.approx(0.25)
    # Per-token statistic: summed NLL differences over summed tokens.
    tokens = np.array([1.0, 3.0])
    value, low, high = claims.two_level_bootstrap(
        np.array([[2.0, 6.0]]), tokens
    )
    assert value == low == high == pytest.approx(2.0)


def test_spearman_and_t_interval_match_scipy(claims):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, size=30).astype(float)  # with ties
    b = a + rng.normal(0, 2, size=30)
    assert claims.spearman(a, b) == pytest.approx(
        scipy_stats.spearmanr(a, b).statistic, abs=1e-12
    )
    assert claims.spearman(a, -a) == pytest.approx(-1.0)
    values = [0.2, 0.5, 0.4]
    mean, low, high = claims.t_interval(values)
    half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert (mean, low, high) == pytest.approx(
        (np.mean(values), np.mean(values) - half, np.mean(values) + half),
        rel=1e-4,
    )


def fake_result(row, seed, nll, correct):
    nll = np.asarray(nll, "float64")
    return {
        "row": row,
        "seed": seed,
        "documents": {
            "t": {
                "gold_nll": nll.tolist(),
                "gold_tokens": [2] * len(nll),
                "correct": list(correct),
            }
        },
    }


def planted(claims, ce_shift, acc_flip):
    """relora_multi = hydralora + `ce_shift` nats/token on every document,
    with `acc_flip` of 100 documents turned wrong (noise-free)."""
    results = []
    for seed in (0, 1, 2):
        base = np.linspace(1.0, 3.0, 100) + seed
        correct = np.ones(100, int)
        worse = correct.copy()
        worse[:acc_flip] = 0
        results.append(fake_result("hydralora", seed, base, correct))
        results.append(
            fake_result("relora_multi", seed, base + 2 * ce_shift, worse)
        )
    return claims.verdicts({"results": results})[0]


def test_verdicts_follow_the_declared_margins(claims):
    assert claims.CE_MARGIN == 0.05 and claims.ACC_MARGIN == 0.02
    assert "**non-inferior" in planted(claims, 0.01, 0)
    assert "**inferior" in planted(claims, 0.2, 0)
    assert "**inferior" in planted(claims, 0.0, 10)
    # Noisy differences around the margin: cannot tell.
    rng = np.random.default_rng(0)
    results = []
    for seed in (0, 1, 2):
        base = rng.normal(2.0, 0.1, 100)
        results.append(fake_result("hydralora", seed, base, [1] * 100))
        results.append(
            fake_result(
                "relora_multi",
                seed,
                base + 2 * (0.05 + rng.normal(0, 0.5, 100)),
                [1] * 100,
            )
        )
    assert "**cannot tell" in claims.verdicts({"results": results})[0]


def test_row_groups_split_the_rows_by_work(claims):
    rows = list(claims.ROWS)
    assert claims.row_groups(rows, 1) == [rows]
    groups = claims.row_groups(rows, 2)
    # Every row once, in the benchmark's order within each group.
    assert sorted(r for g in groups for r in g) == sorted(rows)
    for group in groups:
        assert group == [r for r in rows if r in group]
    names = [[r[0] for r in g] for g in groups]
    # Figure 5's row (3.5) plus one row vs five rows: 4.5 vs 5, the
    # lighter group first.
    assert names[0] == ["relora_multi+reducer", "relora+reducer"]
    assert names[1] == [
        "lora",
        "lora_matched",
        "hydralora",
        "relora_multi",
        "relora_multi_quarter",
    ]
    assert len(claims.row_groups(rows[:2], 8)) == 2
    with pytest.raises(SystemExit):
        claims.parse_args(["--jobs", "0"])


def test_quarter_row_trains_on_the_first_quarter_of_the_stream(claims):
    assert ("relora_multi_quarter", "relora_multi", False) in claims.ROWS
    assert claims.row_steps("relora_multi_quarter", 60) == 15
    assert claims.row_steps("relora_multi_quarter", 3) == 1
    assert claims.row_steps("relora_multi", 60) == 60
    args = claims.parse_args(["--only", "relora_multi_quarter"])
    assert [r[0] for r in args.rows] == ["relora_multi_quarter"]
    args.steps, args.batch_size = 60, 8
    n = 60 * 8
    data = {
        "train": (
            {"token_ids": np.arange(n)[:, None]},
            np.arange(n) + 1000,
            np.ones((n, 2)),
        ),
        "train_tasks": np.arange(n) % 2,
        "train_docs": np.arange(n) + 5000,
        "test": {"sst2": [1, 2]},
    }
    cut = claims.row_data(data, "relora_multi_quarter", args)
    x, y, weights = cut["train"]
    # The first 15 batches of the same stream, every field cut alike.
    np.testing.assert_array_equal(x["token_ids"][:, 0], np.arange(120))
    np.testing.assert_array_equal(y, np.arange(120) + 1000)
    assert weights.shape == (120, 2)
    np.testing.assert_array_equal(cut["train_tasks"], np.arange(120) % 2)
    np.testing.assert_array_equal(cut["train_docs"], np.arange(120) + 5000)
    assert cut["test"] is data["test"]
    # The other rows get the whole stream, untouched.
    assert claims.row_data(data, "relora_multi", args) is data


@needs_assets
@needs_smollm2
@smoke_backend("torch")
def test_paper_claims_quick(tmp_path, claims):
    stdout = run_script(
        "paper_claims.py",
        tmp_path,
        "--seeds",
        "0,1",
        "--only",
        "lora,hydralora,relora_multi,relora_multi+reducer",
    )
    with open(tmp_path / "paper_claims.json") as f:
        payload = json.load(f)
    assert payload["complete"]
    # Each seed's rows ran in two processes side by side (`--jobs 2`): the
    # run's wall time is less than the sum of the processes' times.
    assert sorted(p.name for p in tmp_path.glob("seed*_part*")) == [
        "seed0_part0",
        "seed0_part1",
        "seed1_part0",
        "seed1_part1",
    ]
    assert 0 < payload["total_seconds"] < payload["process_seconds"]
    rows = [(r["row"], r["seed"]) for r in payload["results"]]
    assert rows == [("zero-shot", None)] + [
        (name, seed)
        for seed in (0, 1)
        for name in (
            "lora",
            "hydralora",
            "relora_multi",
            "relora_multi+reducer",
        )
    ]
    settings = payload["settings"]
    counts = payload["param_counts_at_rank"]
    assert payload["matched_rank"] == round(
        counts["relora_multi"] / (counts["lora"] / settings["rank"])
    )
    for result in payload["results"]:
        for task, docs in result["documents"].items():
            assert len(docs["correct"]) == payload["test_sizes"][task] == 4
            assert result["accuracy"][task] == pytest.approx(
                np.mean(docs["correct"])
            )
            assert result["ce_loss"][task] == pytest.approx(
                np.sum(docs["gold_nll"]) / np.sum(docs["gold_tokens"])
            )
        if result["row"] != "zero-shot":
            assert len(result["step_seconds"]) == settings["steps"]
    blocks = settings["blocks"]
    assert len(payload["figure5"]) == 2
    for run in payload["figure5"]:
        importance, lobo = run["importance"], run["lobo_increase"]
        assert len(importance) == len(lobo) == blocks
        assert run["spearman"] == pytest.approx(
            scipy_stats.spearmanr(importance, lobo).statistic, abs=1e-9
        )
        points = run["points"]
        assert len(points) == 1 + 3 * (1 + settings["random_draws"])
        # The undropped point (full scoring) and the leave-one-block-out
        # baseline (gold continuations only) are the same loss.
        assert points[0]["ce_loss_mix"] == pytest.approx(
            run["lobo_base_loss"], rel=1e-4
        )
        for p in points[1:]:
            assert len(p["blocks"]) == int(p["ratio"] * blocks + 0.5)
            if p["strategy"] == "importance":
                assert p["blocks"] == sorted(
                    np.argsort(importance, kind="stable")[
                        : len(p["blocks"])
                    ].tolist()
                )
    assert "Claim 1, `relora_multi` vs `hydralora`" in stdout
    assert "Spearman(importance" in stdout
    assert (tmp_path / "paper_claims.png").exists()
