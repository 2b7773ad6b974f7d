"""The training streams: every batch mixes the tasks, the document splits
never overlap, and the order is reproducible per seed.

`benchmarks/commonsense.py` builds the rows that `commonsense.py`,
`drop_ratio.py` and `paper_claims.py` train on; `relora_offline/
main_job_data.py` builds those of the main job
(`examples/llama3_commonsense.py`). Both are fitted with `shuffle=False`,
so the order they build is the order the model sees. A stream that trained on
one task, then the other, once made every row of those benchmarks end on
the second task; these tests fail on such a stream. The pure functions run
at the benchmarks' real sizes (SST-2 and ARC-Easy: 872 and 570 documents,
250 training rows per task, 60 and 240 steps of 8 rows); `build_data` runs
on the real tokenized tasks where the offline assets are installed (no
model is loaded).
"""

import argparse
import types

import numpy as np
import pytest
from benchmark_scripts import benchmark_module
from benchmark_scripts import needs_assets
from benchmark_scripts import needs_smollm2

DOCUMENTS = {"sst2": 872, "arc_easy": 570}
PAPER_CLAIMS_SIZES = {
    "test_per_task": 250,
    "probe_per_task": 70,
    "train_per_task": 250,
    "batch_size": 2,
    "sequence_length": 64,
}


@pytest.fixture(scope="module")
def commonsense():
    return benchmark_module("commonsense")


def longest_run(labels):
    """The longest run of equal consecutive labels."""
    labels = np.asarray(labels)
    longest = current = 1
    for a, b in zip(labels[:-1], labels[1:], strict=True):
        current = current + 1 if a == b else 1
        longest = max(longest, current)
    return longest


def task_of_rows(order, sizes):
    """The task of each row index of a stream (rows numbered task after
    task)."""
    return np.searchsorted(np.cumsum(sizes), order, side="right")


def test_the_check_catches_a_task_sequential_stream():
    # The old stream: one pass in row order (all SST-2, then all ARC),
    # then reshuffled passes: 31 batches of SST-2 alone at 60 x 8 rows.
    sizes, batch = [250, 250], 8
    passes = [np.arange(500)] + [
        np.random.default_rng(0).permutation(500) for _ in range(3)
    ]
    old = np.concatenate(passes)[: 60 * batch]
    assert longest_run(task_of_rows(old, sizes)) > batch


@pytest.mark.parametrize("steps", [60, 240])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_batch_mixes_the_tasks(commonsense, steps, seed):
    sizes, batch = [250, 250], 8
    order = commonsense.mixed_order(sizes, steps, batch, seed)
    assert order.shape == (steps * batch,)
    tasks = task_of_rows(order, sizes)
    # No run of more than one batch from one task...
    assert longest_run(tasks) <= batch
    # ... and every batch holds 4 rows of each task.
    for start in range(0, len(order), batch):
        assert np.bincount(
            tasks[start : start + batch], minlength=2
        ).tolist() == [
            4,
            4,
        ]
    # Each task's rows in reshuffled passes: its first 250 rows are all
    # of its rows once, and no row is used more than once more than another.
    for t, offset in ((0, 0), (1, 250)):
        rows = order[tasks == t] - offset
        first = rows[: 62 * 4]
        assert len(set(first.tolist())) == len(first) == min(248, len(rows))
        counts = np.bincount(rows, minlength=250)
        assert counts.max() - counts.min() <= 1
    # Shuffled: not the same order of tasks in every batch.
    patterns = {
        tuple(tasks[s : s + batch]) for s in range(0, len(order), batch)
    }
    assert len(patterns) > 10


def test_mixed_order_uneven_tasks_and_batches(commonsense):
    sizes = [5, 40, 13]
    order = commonsense.mixed_order(sizes, 50, 8, seed=3)
    tasks = task_of_rows(order, sizes)
    for start in range(0, len(order), 8):
        counts = np.bincount(tasks[start : start + 8], minlength=3)
        # 8 // 3 = 2 of every task, and 2 more from two tasks.
        assert sorted(counts.tolist()) in ([2, 3, 3],)
    for t, n in enumerate(sizes):
        used = np.bincount(order[tasks == t] - sum(sizes[:t]), minlength=n)
        assert used.max() - used.min() <= 1
    with pytest.raises(ValueError, match="batch_size.*Received: batch_size=2"):
        commonsense.mixed_order(sizes, 5, 2, seed=0)
    with pytest.raises(ValueError, match="task_sizes"):
        commonsense.mixed_order([4, 0], 5, 2, seed=0)


def test_mixed_order_is_reproducible_per_seed(commonsense):
    a = commonsense.mixed_order([250, 250], 240, 8, seed=1)
    b = commonsense.mixed_order([250, 250], 240, 8, seed=1)
    c = commonsense.mixed_order([250, 250], 240, 8, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_interleaved_order_is_a_permutation_that_mixes(commonsense):
    sizes = [70, 70]
    order = commonsense.interleaved_order(sizes, seed=0)
    assert sorted(order.tolist()) == list(range(140))
    tasks = task_of_rows(order, sizes)
    # Equal sizes: each consecutive pair from (k/70, (k+1)/70) keys has
    # one row of each task, so no run is longer than 2.
    assert longest_run(tasks) <= 2
    np.testing.assert_array_equal(
        order, commonsense.interleaved_order(sizes, seed=0)
    )
    assert not np.array_equal(
        order, commonsense.interleaved_order(sizes, seed=1)
    )


@pytest.mark.parametrize(
    "sizes",
    [
        # paper_claims.py: 250 held-out, 70 probe, 250 training per task.
        (250, 70, 250),
        # commonsense.py's full run: 100 held-out, 64 training.
        (100, 0, 64),
    ],
)
def test_splits_never_overlap_and_keep_held_out_fixed(commonsense, sizes):
    test, probe, train = sizes
    for n in DOCUMENTS.values():
        splits = {
            seed: commonsense.split_documents(n, test, probe, train, seed)
            for seed in (0, 1, 2)
        }
        for s in splits.values():
            assert [len(s[k]) for k in ("test", "probe", "train")] == [
                test,
                probe,
                train,
            ]
            sets = [set(s[k].tolist()) for k in ("test", "probe", "train")]
            assert not sets[0] & sets[1]
            assert not sets[0] & sets[2]
            assert not sets[1] & sets[2]
            assert all(0 <= d < n for part in sets for d in part)
        # Held-out and probe documents are the same for every seed.
        for k in ("test", "probe"):
            np.testing.assert_array_equal(splits[0][k], splits[1][k])
        # Reproducible per seed.
        again = commonsense.split_documents(n, test, probe, train, 1)
        np.testing.assert_array_equal(again["train"], splits[1]["train"])
    # SST-2 has more documents than the splits take: seeds draw others.
    sst2 = [
        commonsense.split_documents(872, test, probe, train, s)["train"]
        for s in (0, 1)
    ]
    assert not np.array_equal(*sst2)


def test_split_documents_refuses_too_few_documents(commonsense):
    with pytest.raises(
        ValueError,
        match=r"arc_easy has 570 documents.*Received: test=300, probe=70, "
        r"train=250",
    ):
        commonsense.split_documents(570, 300, 70, 250, 0, name="arc_easy")
    with pytest.raises(ValueError, match="Received: probe=-1"):
        commonsense.split_documents(570, 3, -1, 5, 0)


@pytest.fixture(scope="module")
def real_tasks():
    from relora_offline import olmo_data

    tokenizer = olmo_data.smollm2_tokenizer()
    return {
        name: olmo_data.build_task(name, tokenizer)
        for name in ("sst2", "arc_easy")
    }


@needs_assets
@needs_smollm2
@pytest.mark.parametrize("steps", [60, 240])
def test_build_data_on_the_real_tasks(real_tasks, commonsense, steps):
    from relora_offline import olmo_data

    # paper_claims.py's sizes (test_paper_claims checks they are its).
    args = argparse.Namespace(**PAPER_CLAIMS_SIZES, steps=steps)
    data = commonsense.build_data(args, real_tasks, seed=0)
    x, y, weights = data["train"]
    assert y.shape == (steps * 2, args.sequence_length)
    assert longest_run(data["train_tasks"]) <= args.batch_size
    # Every batch of 2 holds one row of each task.
    for start in range(0, len(y), 2):
        assert np.bincount(
            data["train_tasks"][start : start + 2], minlength=2
        ).tolist() == [1, 1]
    names = list(real_tasks)
    for i, name in enumerate(names):
        split = data["splits"][name]
        trained = set(data["train_docs"][data["train_tasks"] == i].tolist())
        # 60 steps use 60 of a task's 250 training rows, 240 steps 240:
        # no row is trained on twice.
        assert trained <= set(split["train"].tolist())
        assert len(trained) == steps
        assert not trained & set(data["test"][name].tolist())
        assert not trained & set(split["probe"].tolist())
        assert not set(split["probe"].tolist()) & set(split["test"].tolist())
        # Each training row is its document's context + gold continuation.
        rows = np.flatnonzero(data["train_tasks"] == i)[:5]
        for row in rows:
            ref = olmo_data.gold_training_arrays(
                real_tasks[name],
                [data["train_docs"][row]],
                args.sequence_length,
                real_tasks[name].tokenizer.pad_token_id,
            )
            np.testing.assert_array_equal(
                x["token_ids"][row], ref[0]["token_ids"][0]
            )
            np.testing.assert_array_equal(weights[row], ref[2][0])
    # The probe split: every probe document once, the tasks interleaved.
    assert len(data["probe"][1]) == 2 * args.probe_per_task
    assert longest_run(data["probe_tasks"]) <= 2
    # The measured share of whole rows at the default sequence length.
    assert all(v >= 0.95 for v in data["untruncated"].values())
    # Reproducible per seed; another seed orders the rows otherwise.
    again = commonsense.build_data(args, real_tasks, seed=0)
    np.testing.assert_array_equal(again["train"][1], y)
    np.testing.assert_array_equal(again["train_docs"], data["train_docs"])
    other = commonsense.build_data(args, real_tasks, seed=1)
    assert not np.array_equal(other["train_docs"], data["train_docs"])
    for name in names:
        np.testing.assert_array_equal(other["test"][name], data["test"][name])


# -- the main job (`examples/llama3_commonsense.py`) ---------------------------


@pytest.fixture(scope="module")
def main_job():
    from relora_offline import main_job as job
    from relora_offline import main_job_data
    from relora_offline import olmo_data

    return types.SimpleNamespace(
        sizes=job.SIZES["full"],
        tasks=job.TASKS,
        mixed_order=main_job_data.mixed_order,
        split_documents=olmo_data.split_documents,
    )


def fake_task(num_documents):
    """What `olmo_data.split_documents` reads of a task: its samples'
    documents (4 answer choices each)."""
    return types.SimpleNamespace(
        samples=[{"doc_id": d} for d in range(num_documents) for _ in range(4)]
    )


def test_main_job_defaults_are_the_sizes_checked_here(main_job):
    assert tuple(main_job.tasks) == tuple(DOCUMENTS)
    assert {
        k: main_job.sizes[k]
        for k in ("train_per_task", "test_per_task", "steps", "batch_size")
    } == {
        "train_per_task": 250,
        "test_per_task": 200,
        "steps": 60,
        "batch_size": 8,
    }


@pytest.mark.parametrize("steps", [60, 240])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_main_job_every_batch_mixes_the_tasks(main_job, steps, seed):
    batch = main_job.sizes["batch_size"]
    sources = np.repeat([0, 1], main_job.sizes["train_per_task"])
    order = main_job.mixed_order(sources, steps, batch, seed)
    assert order.shape == (steps * batch,)
    tasks = sources[order]
    assert longest_run(tasks) <= batch
    for start in range(0, len(order), batch):
        counts = np.bincount(tasks[start : start + batch], minlength=2)
        assert counts.min() >= batch // 2 - 1
    # Each pass over the 500 rows uses every row once.
    for start in range(0, len(order) - 499, 500):
        assert sorted(order[start : start + 500].tolist()) == list(range(500))
    # The same check fails on a task-sequential stream of these rows.
    assert longest_run(sources[np.arange(steps * batch) % 500]) > batch


def test_main_job_order_with_uneven_tasks(main_job):
    # A task with fewer documents than `--train-per-task` (e.g. 120 and
    # 250): each batch holds each task's share, give or take one.
    sources = np.repeat([0, 1], [120, 250])
    order = main_job.mixed_order(sources, 60, 8, seed=0)
    tasks = sources[order]
    assert longest_run(tasks) <= 8
    for start in range(0, len(order), 8):
        count = np.bincount(tasks[start : start + 8], minlength=2)[0]
        assert abs(count - 8 * 120 / 370) <= 1.5


def test_main_job_order_is_reproducible_per_seed(main_job):
    sources = np.repeat([0, 1], 250)
    a = main_job.mixed_order(sources, 60, 8, seed=1)
    b = main_job.mixed_order(sources, 60, 8, seed=1)
    c = main_job.mixed_order(sources, 60, 8, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_main_job_splits_never_overlap(main_job, seed):
    train_n = main_job.sizes["train_per_task"]
    test_n = main_job.sizes["test_per_task"]
    trains = []
    for i, n in enumerate(DOCUMENTS.values()):
        # The main job splits task `i` with seed `seed + i`.
        train, test = main_job.split_documents(
            fake_task(n), train_n, test_n, seed=seed + i
        )
        assert (len(train), len(test)) == (train_n, test_n)
        assert not set(train.tolist()) & set(test.tolist())
        assert all(0 <= d < n for d in np.concatenate([train, test]))
        again = main_job.split_documents(
            fake_task(n), train_n, test_n, seed=seed + i
        )
        np.testing.assert_array_equal(again[0], train)
        np.testing.assert_array_equal(again[1], test)
        trains.append(train)
    other = main_job.split_documents(
        fake_task(872), train_n, test_n, seed=seed + 5
    )
    assert not np.array_equal(other[0], trains[0])


# -- minilm_tasks.py (and drop_ratio.py on MiniLM) ----------------------------


def fake_preprocessor(x):
    """Token ids that are the row's position: no tokenizer needed."""
    n = len(x[0])
    return {"token_ids": np.arange(n)[:, None], "padding_mask": np.ones((n, 1))}


@needs_assets
def test_minilm_tasks_training_rows_mix_the_tasks():
    minilm_tasks = benchmark_module("minilm_tasks")
    args = minilm_tasks.parse_args([])  # The full run's sizes.
    assert (args.batch_size, args.steps) == (16, 80)
    data = minilm_tasks.build_data(args, fake_preprocessor, seed=0)
    rows = data["train_rows"]
    assert len(rows) == len(data["train"][1]) == 80 * 16
    names = list(args.tasks)
    tasks = np.asarray([names.index(task) for task, _ in rows])
    assert longest_run(tasks) <= args.batch_size
    # Every batch holds each task's share of the rows, give or take one
    # (CB has 45 training rows, the others up to 256).
    sizes = np.bincount(
        [names.index(task) for task, _ in set(rows)], minlength=5
    )
    assert sizes[names.index("cb")] < 64 and sizes.max() == 256
    for start in range(0, len(tasks), 16):
        counts = np.bincount(tasks[start : start + 16], minlength=5)
        assert np.all(np.abs(counts - 16 * sizes / sizes.sum()) < 1.5)
    # Passes: the first pass uses every training row once.
    assert len(set(rows[: sizes.sum()])) == sizes.sum()
    # Each row's label lies in its own task's slice of the union head.
    x, y = data["train"]
    assert np.all(x["label_mask"][np.arange(len(y)), y] == 1.0)
    # Training rows never are test rows.
    for name in names:
        trained = {i for task, i in rows if task == name}
        assert trained and not trained & set(data["test_rows"][name])
    # Seeded: the same seed gives the same rows in the same order.
    again = minilm_tasks.build_data(args, fake_preprocessor, seed=0)
    assert again["train_rows"] == rows
    other = minilm_tasks.build_data(args, fake_preprocessor, seed=1)
    assert other["train_rows"] != rows
