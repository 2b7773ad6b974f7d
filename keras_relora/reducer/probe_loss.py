"""The Reducer's probe loss: the mean loss per target token of one batch."""

import keras
import numpy as np
from keras import ops


def loss_function(model):
    """The model's compiled loss as a function returning unreduced values.

    Args:
        model: A compiled `keras.Model` with a single loss.

    Returns:
        A function `(y_true, y_pred) -> values`, the loss before any
        reduction (e.g. `(batch, tokens)` for a sparse cross-entropy on
        `(batch, tokens, vocabulary)` logits).
    """
    loss = getattr(model, "loss", None)
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if loss is None or isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "`ReducerCallback` computes its probe loss with the model's "
            "compiled loss, and needs exactly one: compile the model with a "
            "single `loss=` (a string, function or `keras.losses.Loss`). "
            f"Received: loss={loss!r}"
        )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # `call` is the loss before reduction.
    return loss


def token_loss_sums(loss_fn, y, y_pred, sample_weight):
    """`(sum of loss * weight, sum of weights)` of one batch, as floats.

    Their ratio is the mean loss per target token: with a `sample_weight`
    (e.g. 1 on answer tokens, 0 elsewhere), the weighted mean over the
    weighted tokens; without, the mean over every loss value. (Keras's own
    `"sum_over_batch_size"` divides the weighted sum by the number of all
    values instead, which shrinks the loss by the fraction of weighted
    tokens.)

    Args:
        loss_fn: `(y_true, y_pred) -> values`, unreduced.
        y: The batch's targets.
        y_pred: The model's outputs on the batch.
        sample_weight: None or weights broadcastable to the loss values
            (extra trailing axes of size 1 are dropped).

    Returns:
        A tuple of two Python floats.
    """
    if y is None:
        raise ValueError(
            "The Reducer's probe batches need targets `y` to compute the "
            "loss: pass `probe_data=(x, y)` or `(x, y, sample_weight)`. "
            "Received: a probe batch with y=None"
        )
    y_pred = keras.tree.map_structure(
        lambda t: ops.cast(ops.convert_to_tensor(t), "float32"), y_pred
    )
    values = loss_fn(keras.tree.map_structure(ops.convert_to_tensor, y), y_pred)
    values = np.asarray(ops.convert_to_numpy(values), dtype="float64")
    if sample_weight is None:
        return float(values.sum()), float(values.size)
    weights = np.asarray(sample_weight, dtype="float64")
    while weights.ndim > values.ndim and weights.shape[-1] == 1:
        weights = weights[..., 0]
    weights = weights.reshape(
        weights.shape + (1,) * (values.ndim - weights.ndim)
    )
    try:
        weights = np.broadcast_to(weights, values.shape)
    except ValueError:
        raise ValueError(
            "The probe batch's `sample_weight` does not fit the loss values "
            f"of shape {values.shape}: pass weights of that shape or a "
            "prefix of it. "
            f"Received: sample_weight of shape {np.shape(sample_weight)}"
        ) from None
    return float((values * weights).sum()), float(weights.sum())


def padding_mask(x):
    """The inputs' `padding_mask` (keras-hub inputs), or None.

    The weights of `probe_tokens="all"`: every token that is not padding.
    """
    if isinstance(x, dict) and "padding_mask" in x:
        return np.asarray(x["padding_mask"], dtype="float64")
    return None
