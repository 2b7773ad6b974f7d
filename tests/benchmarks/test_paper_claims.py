"""`benchmarks/paper_claims.py`: its statistics, its verdicts, a quick run.

The statistics are checked against independent references (scipy's
Spearman and Student-t quantile, the analytic standard error of a mean);
the verdicts on planted differences; the quick run (torch only: it trains
real SmolLM2 blocks, minutes on 2 cores) end to end, with its numbers
re-derived from the per-document results it saved.
"""

import json
import types

import numpy as np
import pytest
from benchmark_scripts import benchmark_module
from benchmark_scripts import needs_assets
from benchmark_scripts import needs_smollm2
from benchmark_scripts import run_script
from benchmark_scripts import smoke_backend

FIG5_ROW = "relora_multi+reducer"

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
    rows = [r for r in claims.ROWS if r[0] in claims.DEFAULT_ROWS]
    assert claims.parse_args([]).rows == rows
    assert claims.row_groups(rows, 1) == [rows]
    groups = claims.row_groups(rows, 2)
    # Every row once, in the benchmark's order within each group.
    assert sorted(r for g in groups for r in g) == sorted(rows)
    for group in groups:
        assert group == [r for r in rows if r in group]
    names = [[r[0] for r in g] for g in groups]
    # Figure 5's row (5.0) alone vs four full rows and the quarter row
    # (0.3 + 0.7 / 4): 5.0 vs 4.475, the lighter group first.
    assert names[0] == [
        "lora",
        "hydralora",
        "relora_multi",
        "relora_multi_rst",
        "relora_multi_quarter",
    ]
    assert names[1] == ["relora_multi+reducer"]
    everything = claims.row_groups(list(claims.ROWS), 2)
    assert sorted(r for g in everything for r in g) == sorted(claims.ROWS)
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


def test_full_sizes_are_those_the_stream_is_checked_at(claims):
    # test_training_stream runs `build_data` on the real tasks at these.
    from test_training_stream import PAPER_CLAIMS_SIZES

    full = claims.SIZES["full"]
    assert {k: full[k] for k in PAPER_CLAIMS_SIZES} == PAPER_CLAIMS_SIZES
    assert full["steps"] >= 240
    assert full["steps"] // full["interval"] >= claims.MIN_PROBES == 24
    assert full["fig5_per_task"] >= 100 and full["random_draws"] >= 5
    assert full["curve_per_task"] == 100
    assert claims.curve_steps(full["steps"]) == [30, 60, 120, 240]
    args = claims.parse_args([])
    assert len(args.seeds) >= 2
    assert args.learning_rate == 1e-3
    # A run resized on the command line keeps its own sizes.
    assert claims.parse_args(["--steps", "100"]).steps == 100
    quick = claims.parse_args(["--quick"])
    assert set(claims.SIZES["quick"]) == set(full)
    assert quick.steps == 3 and quick.seeds == [0]


def test_warmup_cosine_schedule_values(claims):
    from keras import ops

    peak, steps = 2e-3, 240
    warmup = claims.warmup_steps(steps)
    assert warmup == 24
    assert claims.warmup_steps(60) == 6 and claims.warmup_steps(3) == 1
    schedule = claims.warmup_cosine(peak, steps, warmup)
    got = np.array(
        [float(ops.convert_to_numpy(schedule(s))) for s in range(steps + 2)]
    )
    # Reference: numpy, step by step.
    s = np.arange(steps + 2, dtype="float64")
    final = 0.1 * peak
    progress = np.clip((s + 1 - warmup) / (steps - warmup), 0, 1)
    ref = np.where(
        s < warmup,
        peak * (s + 1) / warmup,
        final + (peak - final) * 0.5 * (1 + np.cos(np.pi * progress)),
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12)
    # The numbers: the first update at peak / 24, the peak at the last
    # warmup step, half-way down the cosine at step 131, 10% at the end.
    assert got[0] == pytest.approx(peak / 24, rel=1e-5)
    assert got[23] == pytest.approx(peak, rel=1e-6)
    assert got[23 + 108] == pytest.approx((peak + final) / 2, rel=1e-5)
    assert got[239] == pytest.approx(final, rel=1e-5)
    assert got[241] == pytest.approx(final, rel=1e-5)
    assert np.all(np.diff(got[23:240]) < 0)
    # The quarter row gets the same shape over its own 60 steps.
    args = claims.parse_args(["--steps", "240"])
    quarter = claims.row_schedule("relora_multi_quarter", args)
    lr = args.learning_rate
    assert float(ops.convert_to_numpy(quarter(5))) == pytest.approx(lr)
    assert float(ops.convert_to_numpy(quarter(59))) == pytest.approx(lr / 10)
    with pytest.raises(ValueError, match="warmup"):
        claims.warmup_cosine(peak, 10, 0)


def test_curve_steps_and_reducer_arguments(claims):
    assert claims.curve_steps(3) == [1, 2, 3]
    assert claims.row_curve_steps("relora_multi", 240) == [30, 60, 120, 240]
    assert claims.row_curve_steps("relora_multi_quarter", 240) == [30, 60]
    assert claims.row_curve_steps("relora_multi_quarter", 3) == [1]
    args = claims.parse_args(["--steps", "240"])
    probe = ({"token_ids": np.zeros((4, 2))}, np.zeros((4, 2)))
    reducer = claims.reducer_kwargs(
        "relora_multi+reducer", args, {"probe": probe}
    )
    assert reducer == {"interval": 10, "probe_data": probe}
    rst = claims.reducer_kwargs("relora_multi_rst", args, {"probe": probe})
    assert rst["interval"] == 241 and rst["probe_data"] is probe
    assert ("relora_multi_rst", "relora_multi", True) in claims.ROWS


def test_untruncated_fraction_counts_rows_that_fit():
    commonsense = benchmark_module("commonsense")

    def sample(doc, ctx, cont, gold=True):
        return {
            "doc_id": doc,
            "cont_id": 0 if gold else 1,
            "label_id": 0,
            "ctx": list(range(ctx)),
            "continuation": list(range(cont)),
        }

    # A row is context + gold continuation less one token (the last is
    # only a target): 10 + 3 - 1 = 12 tokens, 20 + 5 - 1 = 24, 6 + 1 - 1.
    task = types.SimpleNamespace(
        samples=[
            sample(0, 10, 3),
            sample(0, 50, 50, gold=False),  # not the gold continuation
            sample(1, 20, 5),
            sample(2, 6, 1),
            sample(3, 99, 1),  # not asked for
        ]
    )
    assert commonsense.untruncated_fraction(task, [0, 1, 2], 24) == 1.0
    assert commonsense.untruncated_fraction(
        task, [0, 1, 2], 23
    ) == pytest.approx(2 / 3)
    assert commonsense.untruncated_fraction(
        task, [0, 1, 2], 11
    ) == pytest.approx(1 / 3)
    assert commonsense.untruncated_fraction(task, [1, 3], 24) == 0.5


def test_macro_bootstrap_weighs_every_task_the_same(claims):
    # Constant differences, 100 and 10 documents: the macro average is the
    # mean of the two tasks' values, not the pooled mean.
    diffs = [np.full((2, 100), 1.0), np.full((2, 10), 3.0)]
    value, low, high = claims.macro_bootstrap(diffs, num_resamples=500)
    assert value == low == high == pytest.approx(2.0)
    pooled = claims.two_level_bootstrap(np.concatenate(diffs, axis=1))
    assert pooled[0] == pytest.approx((100 + 30) / 110)
    # Per-token statistic within each task.
    tokens = [np.full(100, 2.0), np.full(10, 3.0)]
    value, low, high = claims.macro_bootstrap(diffs, tokens, num_resamples=500)
    assert value == low == high == pytest.approx((0.5 + 1.0) / 2)
    # One seed, noisy documents: the interval matches the analytic standard
    # error of a mean of two independent task means.
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1.0, (1, 400)), rng.normal(-0.1, 2.0, (1, 300))
    value, low, high = claims.macro_bootstrap([a, b], num_resamples=4000)
    assert value == pytest.approx((a.mean() + b.mean()) / 2)
    se = 0.5 * np.sqrt(a.var(ddof=1) / a.shape[1] + b.var(ddof=1) / b.shape[1])
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    with pytest.raises(ValueError, match="same seeds"):
        claims.macro_bootstrap([np.zeros((2, 3)), np.zeros((3, 3))])


def test_split_half_reliability(claims):
    assert claims.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert claims.spearman_brown(1.0) == 1.0
    assert claims.spearman_brown(0.0) == 0.0
    rng = np.random.default_rng(3)
    blocks, docs = 30, 200
    tokens = rng.integers(1, 6, docs).astype(float)
    truth = rng.normal(0, 1, blocks)
    # One split, against scipy on the same halves.
    increase = truth[:, None] * tokens + rng.normal(0, 3, (blocks, docs))
    one = claims.split_half(increase, tokens, num_splits=1, seed=5)
    order = np.random.default_rng(5).permutation(docs)
    a, b = order[:100], order[100:]
    r = scipy_stats.spearmanr(
        increase[:, a].sum(1) / tokens[a].sum(),
        increase[:, b].sum(1) / tokens[b].sum(),
    ).statistic
    assert one["half_spearman"] == pytest.approx(r, abs=1e-12)
    assert one["spearman_brown"] == pytest.approx(2 * r / (1 + r))
    # Noise-free documents agree with themselves completely.
    exact = claims.split_half(truth[:, None] * tokens, tokens, num_splits=20)
    assert exact["half_spearman"] == exact["spearman_brown"] == 1.0

    # The corrected split-half estimates the agreement of two independent
    # full-size samples of documents (simulated here), which the
    # uncorrected half correlation underestimates.
    def sample():
        return truth[:, None] * tokens + rng.normal(0, 30, (blocks, docs))

    def per_token(x):
        return x.sum(1) / tokens.sum()

    replicate = np.mean(
        [
            scipy_stats.spearmanr(
                per_token(sample()), per_token(sample())
            ).statistic
            for _ in range(200)
        ]
    )
    estimates = [claims.split_half(sample(), tokens, 50) for _ in range(20)]
    corrected = np.mean([e["spearman_brown"] for e in estimates])
    half = np.mean([e["half_spearman"] for e in estimates])
    assert 0.4 < replicate < 0.9
    assert corrected == pytest.approx(replicate, abs=0.06)
    assert half < replicate - 0.05


def two_task_result(row, seed, shift, flips=0):
    """A result on tasks `a` (40 documents, 1 gold token each) and `b`
    (10 documents, 4 tokens each), loss shifted by `shift` per token."""
    out = {"row": row, "seed": seed, "documents": {}, "ce_loss": {}}
    out["accuracy"] = {}
    for task, n, tok in (("a", 40, 1), ("b", 10, 4)):
        nll = (np.linspace(1, 2, n) + seed + shift[task]) * tok
        correct = np.ones(n, int)
        correct[: flips if task == "b" else 0] = 0
        out["documents"][task] = {
            "doc_ids": list(range(n)),
            "gold_nll": nll.tolist(),
            "gold_tokens": [tok] * n,
            "correct": correct.tolist(),
        }
        out["ce_loss"][task] = float(nll.sum() / (tok * n))
        out["accuracy"][task] = float(correct.mean())
    out["adapter_params"] = 1
    out["icl_metrics"] = {t: {"bpb_v1": 1.0} for t in ("a", "b")}
    return out


def test_per_task_macro_and_pooled_intervals(claims):
    shift = {"a": 0.1, "b": 0.3}
    pairs = [
        (
            two_task_result("x", seed, shift, flips=2),
            two_task_result("lora", seed, {"a": 0.0, "b": 0.0}),
        )
        for seed in (0, 1)
    ]
    out = claims.bootstrap_pairs(pairs, seed=0)
    nll = out["gold_nll"]
    assert nll["tasks"]["a"] == pytest.approx((0.1, 0.1, 0.1))
    assert nll["tasks"]["b"] == pytest.approx((0.3, 0.3, 0.3))
    assert nll["macro"] == pytest.approx((0.2, 0.2, 0.2))
    # Pooled: 40 tokens at +0.1 and 40 at +0.3.
    assert nll["pooled"][0] == pytest.approx((40 * 0.1 + 40 * 0.3) / 80)
    acc = out["correct"]
    assert acc["tasks"]["b"][0] == pytest.approx(-0.2)
    assert acc["macro"][0] == pytest.approx(-0.1)
    assert acc["pooled"][0] == pytest.approx(-2 / 50)
    # Rows scored on other documents are refused.
    other = two_task_result("x", 0, shift)
    other["documents"]["a"]["doc_ids"] = list(range(1, 41))
    with pytest.raises(ValueError, match="other documents"):
        claims.bootstrap_pairs([(other, pairs[0][1])], seed=0)
    # The tables show the macro average beside the tasks and the pooled.
    payload = {
        "results": [r for pair in pairs for r in pair],
        "base_params": 100,
    }
    ce_table, acc_table = claims.task_tables(payload)
    x_row = next(
        line for line in ce_table.splitlines() if line.startswith("| x ")
    )
    cells = [c.strip() for c in x_row.strip("|").split("|")]
    headers = [
        c.strip() for c in ce_table.splitlines()[0].strip("|").split("|")
    ]
    row = dict(zip(headers, cells, strict=True))
    ref = np.mean(
        [np.mean([r["ce_loss"][t] for t in ("a", "b")]) for r, _ in pairs]
    )
    assert float(row["macro"]) == pytest.approx(ref, abs=1e-4)
    assert row["macro - lora [95%]"] == "+0.2000 [+0.2000, +0.2000]"
    assert "pooled - lora [95%]" in headers
    assert "(reference)" in acc_table


def test_rst_row_never_probes_and_updates_k_random_blocks(claims):
    import keras
    import tiny_models as tm
    from keras import ops

    import keras_relora

    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm(num_layers=8)
    lm.enable_relora(rank=2, **keras_relora.VARIANTS["relora_multi"])
    steps, batch, length = 40, 2, 4
    args = claims.parse_args(["--steps", str(steps), "--interval", "1"])
    lm.compile(
        optimizer=keras.optimizers.AdamW(
            claims.row_schedule("relora_multi_rst", args)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)

    def rows(n):
        x = {
            "token_ids": rng.integers(0, tm.VOCAB, (n, length)),
            "padding_mask": np.ones((n, length), "int32"),
        }
        return x, rng.integers(0, tm.VOCAB, (n, length))

    x, y = rows(steps * batch)
    kwargs = claims.reducer_kwargs("relora_multi_rst", args, {"probe": rows(8)})
    reducer = keras_relora.ReducerCallback(
        seed=0, log_importance=False, **kwargs
    )
    adapters = list(keras_relora.get_state(lm).adapters.values())

    def b_kernels():
        return [
            (a.block, ops.convert_to_numpy(a.b_kernel).copy()) for a in adapters
        ]

    changed = []

    class Changed(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            _ = self.model  # On JAX, syncs the state first.
            self.before = b_kernels()

        def on_train_batch_end(self, batch, logs=None):
            _ = self.model
            after = b_kernels()
            changed.append(
                sorted(
                    {
                        block
                        for (block, b0), (_, b1) in zip(
                            self.before, after, strict=True
                        )
                        if not np.array_equal(b0, b1)
                    }
                )
            )

    # In two `fit` calls, as the script trains around a curve point.
    half = steps // 2 * batch
    for part in (slice(0, half), slice(half, None)):
        lm.fit(
            {k: v[part] for k, v in x.items()},
            y[part],
            batch_size=batch,
            shuffle=False,
            verbose=0,
            callbacks=[Changed(), reducer],
        )
    assert len(changed) == steps
    # K = L / 4 = 2 of the 8 blocks' B change at every step...
    assert all(len(blocks) == 2 for blocks in changed)
    # ... the scores never move (no probe ran) ...
    assert reducer.probes_run == 0
    np.testing.assert_array_equal(reducer.importance, np.zeros(8))
    counts = np.bincount(np.concatenate(changed), minlength=8)
    np.testing.assert_array_equal(reducer.update_counts, counts)
    # ... so the blocks are drawn uniformly: each of the 8 about 80 / 8
    # times (chi-square against uniform).
    assert counts.sum() == 2 * steps and counts.min() > 0
    assert scipy_stats.chisquare(counts).pvalue > 0.01


@needs_assets
@needs_smollm2
@smoke_backend("torch")
def test_paper_claims_quick(tmp_path, claims):
    names = (
        "lora",
        "hydralora",
        "relora_multi",
        "relora_multi+reducer",
        "relora_multi_rst",
    )
    stdout = run_script(
        "paper_claims.py", tmp_path, "--seeds", "0,1", "--only", ",".join(names)
    )
    with open(tmp_path / "paper_claims.json") as f:
        payload = json.load(f)
    assert payload["complete"]
    # Each seed's rows ran in two processes, two at a time (`--jobs 2`): the
    # run's wall time is less than the sum of the processes' times.
    assert sorted(p.name for p in tmp_path.glob("seed*_part*")) == [
        "seed0_part0",
        "seed0_part1",
        "seed1_part0",
        "seed1_part1",
    ]
    assert 0 < payload["total_seconds"] < payload["process_seconds"]
    # The part files keep their own rows: the merge wrote a new file.
    with open(tmp_path / "seed0_part0" / "paper_claims.json") as f:
        part = json.load(f)
    assert {r["seed"] for r in part["results"]} <= {0, None}
    assert "process_seconds" not in part
    rows = [(r["row"], r["seed"]) for r in payload["results"]]
    assert rows == [("zero-shot", None)] + [
        (name, seed) for seed in (0, 1) for name in names
    ]
    settings = payload["settings"]
    steps, blocks = settings["steps"], settings["blocks"]
    counts = payload["param_counts_at_rank"]
    assert payload["matched_rank"] == round(
        counts["relora_multi"] / (counts["lora"] / settings["rank"])
    )
    # The share of untruncated training rows, measured per seed and task.
    assert set(payload["untruncated"]) == {"0", "1"}
    for shares in payload["untruncated"].values():
        assert set(shares) == {"sst2", "arc_easy"}
        assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert "training rows that fit 48 tokens untruncated" in stdout
    results = {(r["row"], r["seed"]): r for r in payload["results"]}
    for result in payload["results"]:
        for task, docs in result["documents"].items():
            assert len(docs["correct"]) == payload["test_sizes"][task] == 4
            assert result["accuracy"][task] == pytest.approx(
                np.mean(docs["correct"])
            )
            assert result["ce_loss"][task] == pytest.approx(
                np.sum(docs["gold_nll"]) / np.sum(docs["gold_tokens"])
            )
        # The learning curve: a point per curve step, each task's loss
        # the token-weighted mean of its saved documents.
        curve = result["curve"]
        if result["row"] == "zero-shot":
            assert [p["step"] for p in curve] == [0]
        else:
            assert len(result["step_seconds"]) == steps
            assert [p["step"] for p in curve] == [1, 2, 3]
        for point in curve:
            for task, docs in point["documents"].items():
                assert len(docs["doc_ids"]) == settings["curve_per_task"]
                assert set(docs["doc_ids"]) <= set(
                    result["documents"][task]["doc_ids"]
                )
                assert point["ce_loss"][task] == pytest.approx(
                    np.sum(docs["gold_nll"]) / np.sum(docs["gold_tokens"])
                )
        # Its last point is the final model's, on the same documents.
        for task, docs in curve[-1]["documents"].items():
            final = result["documents"][task]
            index = [final["doc_ids"].index(d) for d in docs["doc_ids"]]
            np.testing.assert_allclose(
                docs["gold_nll"], np.asarray(final["gold_nll"])[index]
            )
    # The learning-rate schedule and the curve's segments change nothing of
    # the pairing: every row has the same curve documents.
    curve_docs = {
        r["row"]: r["curve"][0]["documents"]["sst2"]["doc_ids"]
        for r in payload["results"]
    }
    assert len({tuple(v) for v in curve_docs.values()}) == 1
    for seed in (0, 1):
        # K = L / 4 = 1 of the 4 blocks' B updated per step in both
        # Reducer rows; the uniform row never probed, its scores stayed 0.
        reducer = results[("relora_multi+reducer", seed)]["reducer"]
        uniform = results[("relora_multi_rst", seed)]["reducer"]
        assert reducer["probes_run"] == steps // settings["interval"] == 3
        assert uniform["probes_run"] == 0 and uniform["interval"] > steps
        assert results[("relora_multi_rst", seed)]["importance"] == [0.0] * 4
        for r in (reducer, uniform):
            assert r["update_layers"] == 1
            assert sum(r["update_counts"]) == steps * 1
    assert len(payload["figure5"]) == 2
    for run in payload["figure5"]:
        importance, lobo = run["importance"], run["lobo_increase"]
        assert len(importance) == len(lobo) == blocks
        assert run["spearman"] == pytest.approx(
            scipy_stats.spearmanr(importance, lobo).statistic, abs=1e-9
        )
        # The per-document leave-one-block-out losses give the increases.
        docs = run["lobo_documents"]
        tokens = np.asarray(docs["gold_tokens"], float)
        increase = np.asarray(docs["block_nll"]) - np.asarray(docs["base_nll"])
        assert increase.shape == (blocks, 2 * settings["fig5_per_task"])
        np.testing.assert_allclose(lobo, increase.sum(1) / tokens.sum())
        assert run["lobo_base_loss"] == pytest.approx(
            np.sum(docs["base_nll"]) / tokens.sum()
        )
        # The gold-only baseline equals the full scoring of the same model
        # (the Reducer row's final results) on the same documents.
        final = results[(FIG5_ROW, run["seed"])]["documents"]
        for task, doc, nll in zip(
            docs["tasks"], docs["doc_ids"], docs["base_nll"], strict=True
        ):
            i = final[task]["doc_ids"].index(doc)
            assert nll == pytest.approx(final[task]["gold_nll"][i], rel=1e-4)
        # The noise ceiling, recomputed with scipy on the same splits.
        rng = np.random.default_rng(run["seed"])
        n = increase.shape[1]
        halves = []
        for _ in range(run["split_half"]["splits"]):
            order = rng.permutation(n)
            a, b = order[: n // 2], order[n // 2 :]
            r = scipy_stats.spearmanr(
                increase[:, a].sum(1) / tokens[a].sum(),
                increase[:, b].sum(1) / tokens[b].sum(),
            ).statistic
            halves.append(0.0 if np.isnan(r) else r)
        half = np.mean(halves)
        assert run["split_half"]["half_spearman"] == pytest.approx(
            half, abs=1e-9
        )
        assert run["split_half"]["spearman_brown"] == pytest.approx(
            2 * half / (1 + half)
        )
        points = run["points"]
        assert len(points) == 1 + 3 * (1 + settings["random_draws"])
        assert points[0]["blocks"] == []
        for p in points[1:]:
            assert len(p["blocks"]) == int(p["ratio"] * blocks + 0.5)
            if p["strategy"] == "importance":
                assert p["blocks"] == sorted(
                    np.argsort(importance, kind="stable")[
                        : len(p["blocks"])
                    ].tolist()
                )
            if len(p["blocks"]) == 1:
                # One block dropped: the leave-one-block-out evaluation of
                # that block, run again.
                block = p["blocks"][0]
                assert p["ce_loss_mix"] == pytest.approx(
                    run["lobo_base_loss"] + lobo[block], rel=1e-4
                )
    assert "Claim 1, `relora_multi` vs `hydralora` (macro" in stdout
    assert "macro - lora [95%]" in stdout and "pooled - lora [95%]" in stdout
    assert "relora_multi_rst" in stdout
    assert "Spearman(importance" in stdout
    assert "split-half reliability" in stdout
    assert (tmp_path / "paper_claims.png").exists()
    assert (tmp_path / "paper_claims_curve.png").exists()
