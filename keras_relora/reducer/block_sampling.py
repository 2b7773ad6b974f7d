"""The Reducer's sampling and score rule, as pure functions.

Two samplers, both "successive sampling without replacement":

* `update_mask`: which `K` blocks update their B experts at a training step,
  with probability proportional to `sigmoid(-scores)`. It runs inside the
  compiled train step, with `keras.ops` only, as Gumbel top-k: the `K`
  largest `log p_l + G_l` (`G_l` i.i.d. standard Gumbel) are a sample of `K`
  items drawn one after another without replacement, each with probability
  proportional to `p` among those left (Vieira 2014; Kool et al. 2019).
* `suppressed_blocks`: which blocks the probe suppresses, with probability
  proportional to `sigmoid(scores)`. It runs in Python (numpy) between
  steps.

The random numbers of `update_mask` come from a counter-based hash of
`(seed, step, block)` rather than a `keras.random.SeedGenerator`: a seed
generator's state would be one more variable to thread through the
optimizer step of every backend, while a hash of the step counter needs
none, gives the same draws whether the step runs in a fresh process or not
(an interrupted run resumed from a checkpoint takes the same decisions),
and is computed exactly alike by JAX, TensorFlow and torch (32-bit integer
ops with wrap-around multiplication).

`update_scores` is the score rule of IST (Yao et al. 2024), as its
reference code computes it. A HIGH score means suppressing the block barely
hurt (the block matters little); users see `importance = -scores`.
"""

import numpy as np
from keras import ops

# lowbias32 (Chris Wellons' "hash prospector"): two multiply-xorshift rounds,
# a bijection on 32-bit words with good avalanche. Constants as int32.
_MUL_1 = 0x7FEB352D
_MUL_2 = 0x846CA68B - (1 << 32)
# Domain separation of the seed, so that seed 0 and step 0 do not cancel.
_SEED_SALT = 0x3C6EF372
_INACTIVE_SCORE = 1e30  # Scores of pruned blocks: never sampled to update.


def _logical_shift(x, bits):
    """`x >> bits` on int32 as if it were uint32 (zero fill)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _int32(value):
    return ops.convert_to_tensor(value, dtype="int32")


def lowbias32(x):
    """The lowbias32 integer hash of an int32 tensor, elementwise.

    Args:
        x: int32 tensor. Read as 32-bit words.

    Returns:
        An int32 tensor of the same shape: the hashed words (a uint32 value
        `u` is returned as `u - 2**32` when `u >= 2**31`).
    """
    x = ops.bitwise_xor(x, _logical_shift(x, 16))
    x = ops.multiply(x, _int32(_MUL_1))
    x = ops.bitwise_xor(x, _logical_shift(x, 15))
    x = ops.multiply(x, _int32(_MUL_2))
    return ops.bitwise_xor(x, _logical_shift(x, 16))


def block_uniforms(seed, step, num_blocks):
    """Uniform numbers in `(0, 1)`, one per block, from `(seed, step)`.

    Args:
        seed: int or int32 scalar tensor.
        step: int or integer tensor of any shape `S` (e.g. a vector of
            steps, to draw many samples at once).
        num_blocks: int. `L`.

    Returns:
        float32 tensor of shape `S + (L,)`; each entry is a multiple of
        `2**-24` plus `2**-25`, so never 0 or 1.
    """
    seed = ops.cast(seed, "int32")
    step = ops.cast(step, "int32")
    h = lowbias32(ops.bitwise_xor(seed, _int32(_SEED_SALT)))
    h = lowbias32(ops.bitwise_xor(h, step))  # shape S
    blocks = ops.arange(num_blocks, dtype="int32")
    h = lowbias32(ops.bitwise_xor(ops.expand_dims(h, -1), blocks))  # S + (L,)
    top = ops.cast(_logical_shift(h, 8), "float32")  # 24 bits, exact
    return (top + 0.5) * (2.0**-24)


def update_mask(scores, seed, step, k):
    """The blocks that update their B at `step`: a boolean mask of shape (L,).

    Samples `k` blocks without replacement with probability proportional to
    `sigmoid(-scores)` (Gumbel top-k). Deterministic in
    `(scores, seed, step, k)`.

    Args:
        scores: float32 tensor of shape `(L,)` (or `S + (L,)` with `step`
            of shape `S`).
        seed: int or int32 scalar tensor.
        step: int or integer tensor of shape `S`.
        k: int or int32 scalar tensor. Number of blocks to update; `k >= L`
            selects every block.

    Returns:
        A bool tensor of shape `S + (L,)` with `min(k, L)` True per row.
    """
    scores = ops.convert_to_tensor(scores, dtype="float32")
    num_blocks = scores.shape[-1]
    u = block_uniforms(seed, step, num_blocks)
    gumbel = -ops.log(-ops.log(u))
    keys = ops.log_sigmoid(-scores) + gumbel  # (..., L)
    # Rank of each key among the L keys (0 = largest), ties broken by the
    # lower block index: L*L comparisons, cheaper than a sort for small L
    # and with no data-dependent shape.
    mine = ops.expand_dims(keys, -1)  # (..., L, 1)
    others = ops.expand_dims(keys, -2)  # (..., 1, L)
    index = ops.arange(num_blocks, dtype="int32")
    earlier = ops.expand_dims(index, -1) > ops.expand_dims(index, 0)
    beats = ops.logical_or(
        others > mine, ops.logical_and(others == mine, earlier)
    )  # (..., L, L): block j's key beats block l's
    rank = ops.sum(ops.cast(beats, "int32"), axis=-1)  # (..., L)
    return rank < ops.cast(k, "int32")


def active_scores(scores, active):
    """Scores as the update sampler sees them: pruned blocks never drawn."""
    scores = np.asarray(scores, dtype="float32")
    return np.where(active, scores, np.float32(_INACTIVE_SCORE))


def suppressed_blocks(scores, count, trials, rng, active=None):
    """The blocks each probe trial suppresses.

    Each trial draws `count` blocks without replacement, successively, with
    probability proportional to `sigmoid(scores)` among the active blocks.

    Args:
        scores: array of shape `(L,)`.
        count: int. Blocks per trial (capped at the number of active ones).
        trials: int. Number of trials.
        rng: `numpy.random.Generator`.
        active: bool array of shape `(L,)` or None (all active).

    Returns:
        An int array of shape `(trials, min(count, active blocks))`.
    """
    scores = np.asarray(scores, dtype="float64")
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            "`scores` must be finite to sample blocks from. "
            f"Received: scores={scores!r}"
        )
    weights = 1.0 / (1.0 + np.exp(-scores))
    if active is not None:
        weights = weights * np.asarray(active, dtype="float64")
    count = min(count, int(np.count_nonzero(weights)))
    if count == 0:
        raise ValueError(
            "No active block to suppress: every block is pruned. "
            f"Received: active={active!r}"
        )
    return np.stack(
        [
            rng.choice(
                len(scores), count, replace=False, p=weights / weights.sum()
            )
            for _ in range(trials)
        ]
    ).reshape(trials, count)


def update_scores(scores, suppressed, losses, lr):
    """The probe's score update (IST's rule).

    With `p = sigmoid(scores)` taken before the update, rewards
    `r_k = exp(-loss_k)` and centred rewards `r̂_k = r_k - mean(r)`, every
    block `l` suppressed in trial `k` gets
    `scores[l] += lr * r̂_k * p_l * (1 - p_l)`.

    Args:
        scores: array of shape `(L,)`.
        suppressed: int array of shape `(trials, count)`: the blocks each
            trial suppressed.
        losses: array of shape `(trials,)`: the probe loss of each trial.
        lr: float. The score learning rate.

    Returns:
        The new scores, a float32 array of shape `(L,)`.
    """
    scores = np.asarray(scores, dtype="float64")
    losses = np.asarray(losses, dtype="float64")
    if not (np.all(np.isfinite(losses)) and np.all(np.isfinite(scores))):
        raise ValueError(
            "The score update needs finite `scores` and `losses` (the "
            "`ReducerCallback` skips a probe with a non-finite loss). "
            f"Received: scores={scores!r}, losses={losses!r}"
        )
    p = 1.0 / (1.0 + np.exp(-scores))
    rewards = np.exp(-losses)
    centred = rewards - rewards.mean()
    new = scores.copy()
    for blocks, reward in zip(np.asarray(suppressed), centred, strict=False):
        for block in blocks:
            new[block] += lr * reward * p[block] * (1.0 - p[block])
    return new.astype("float32")
