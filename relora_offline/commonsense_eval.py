"""Scoring of commonsense examples: candidate-label logits, one pass each.

The evaluation half of `relora_offline.commonsense` (the data half is
`commonsense_data`). Import the public names from
`relora_offline.commonsense`.
"""

import numpy as np

from relora_offline.commonsense_data import ANSWER_PREFIX
from relora_offline.commonsense_data import _common_prefix_length
from relora_offline.commonsense_data import _encode
from relora_offline.commonsense_data import _resolve_tokenizer


def choice_tokens(tokenizer, example):
    """Tokenizes an example for scoring its candidate labels.

    Each candidate's full text, `prompt + "the correct answer is " +
    choice`, is tokenized; the context is their longest common token prefix
    and each candidate is scored by its first token after it (e.g. `1` of
    `answer1`, or ` true`).

    Args:
        tokenizer: a keras-hub tokenizer, or a model or preprocessor that
            holds one.
        example: dict. A commonsense example from `load_task`.

    Returns:
        `(context_ids, candidate_ids)`: two lists of ints.
    """
    tokenizer = _resolve_tokenizer(tokenizer)
    texts = [example["prompt"] + ANSWER_PREFIX + c for c in example["choices"]]
    sequences = [_encode(tokenizer, t) for t in texts]
    n = _common_prefix_length(sequences)
    if n == 0 or any(len(s) == n for s in sequences):
        raise ValueError(
            "The candidate answers share no context or one is a prefix of "
            f"another. Received: choices={example['choices']}"
        )
    candidates = [s[n] for s in sequences]
    return sequences[0][:n], candidates


def _bucket(length, multiple=32):
    return -(-length // multiple) * multiple


def choice_logits(
    causal_lm, examples, batch_size=8, max_length=None, tokenizer=None
):
    """Returns the logits of each example's candidate labels.

    One forward pass per example, in right-padded batches of `batch_size`.
    Examples are batched in order of length (results come back in the
    given order), lengths are rounded up to a multiple of 32 and the last
    batch is filled with copies, so few shapes are compiled. The logits are
    read at the last context position only.

    Args:
        causal_lm: a `keras_hub.models.CausalLM` whose backbone takes
            `token_ids` and `padding_mask` (e.g. `Llama3CausalLM`).
        examples: list of commonsense examples from `load_task`.
        batch_size: int. Defaults to `8`.
        max_length: int or `None`. Contexts longer than this keep their last
            `max_length` tokens. Defaults to `None` (no limit).
        tokenizer: a keras-hub tokenizer or preprocessor, or `None` to use
            `causal_lm.preprocessor`'s. Defaults to `None`.

    Returns:
        list of float32 numpy arrays, one per example, of shape
        `(len(example["choices"]),)`.
    """
    from keras import ops

    if batch_size < 1:
        raise ValueError(
            "`batch_size` must be at least 1. "
            f"Received: batch_size={batch_size}"
        )
    tokenizer = _resolve_tokenizer(tokenizer or causal_lm)
    backbone = causal_lm.backbone
    encoded = []
    for example in examples:
        context, candidates = choice_tokens(tokenizer, example)
        if max_length is not None:
            context = context[-max_length:]
        encoded.append((context, candidates))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    results = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        rows += [rows[0]] * (batch_size - len(rows))
        length = _bucket(max(len(encoded[i][0]) for i in rows))
        token_ids = np.zeros((batch_size, length), "int32")
        padding_mask = np.zeros((batch_size, length), "int32")
        for row, i in enumerate(rows):
            context = encoded[i][0]
            token_ids[row, : len(context)] = context
            padding_mask[row, : len(context)] = 1
        hidden = backbone.predict_on_batch(
            {"token_ids": token_ids, "padding_mask": padding_mask}
        )  # (batch, length, hidden_dim)
        last = padding_mask.sum(axis=1) - 1
        hidden = ops.convert_to_numpy(hidden)[np.arange(batch_size), last]
        logits = backbone.token_embedding(
            ops.convert_to_tensor(hidden), reverse=True
        )  # (batch, vocabulary_size)
        logits = ops.convert_to_numpy(ops.cast(logits, "float32"))
        for row, i in enumerate(rows):
            results[i] = logits[row, encoded[i][1]]
    return results


def score_choices(
    causal_lm, examples, batch_size=8, max_length=None, tokenizer=None
):
    """Accuracy of a causal LM on commonsense examples.

    The prediction is the candidate label whose first distinguishing token
    has the largest logit at the answer position (see `choice_tokens` and
    `choice_logits`); no text is generated.

    Args:
        causal_lm: a `keras_hub.models.CausalLM`, e.g. `Llama3CausalLM`.
        examples: list of commonsense examples from `load_task`.
        batch_size: int. Examples per forward pass. Defaults to `8`.
        max_length: int or `None`. See `choice_logits`. Defaults to `None`.
        tokenizer: a keras-hub tokenizer or preprocessor, or `None` to use
            `causal_lm.preprocessor`'s (pass it when the preprocessor was
            set to `None` for `fit`). Defaults to `None`.

    Returns:
        float. The fraction of examples answered right.
    """
    if not examples:
        raise ValueError("`examples` is empty. Received: examples=[]")
    logits = choice_logits(
        causal_lm, examples, batch_size, max_length, tokenizer
    )
    right = [int(np.argmax(x)) == e["label"] for x, e in zip(logits, examples)]
    return float(np.mean(right))
