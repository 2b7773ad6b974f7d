"""`prune`: static pruning of the B experts of whole blocks (Figure 5)."""

import numpy as np
from keras import ops

from keras_relora._checks import choice_arg
from keras_relora._checks import float_arg
from keras_relora.adapt.state import require_state

STRATEGIES = ("importance", "random")


def prune(model, drop_ratio, importance=None, strategy="importance", seed=None):
    """Removes the B experts of the least important blocks, for good.

    Changes `model` in place: in every block chosen, each adapter's B
    kernel and router are removed from the model (`ReloraDense.prune`), so
    they leave the trainable variables, `save_weights` files and adapter
    checkpoints, and the adapted layers of those blocks return their base
    layer's output. Shared A kernels stay (other blocks use them). Compile
    the model again (with a new optimizer) before training it further.

    Args:
        model: A model adapted by `enable_relora`.
        drop_ratio: float in `[0, 1]`. Fraction of the model's `L` blocks
            whose B experts are removed: `round(drop_ratio * L)` blocks
            (halves round up), counting blocks pruned before.
        importance: array of shape `(L,)`, higher = more important, or
            None to use the importance a `ReducerCallback` learned on this
            model (`-scores`). Used by `strategy="importance"`.
        strategy: `"importance"` removes the least important blocks (ties
            go to the lower block index); `"random"` removes random blocks
            (the paper's baseline). Defaults to `"importance"`.
        seed: int or None. Seed of `strategy="random"`.

    Returns:
        A sorted list of the block indices pruned by this call.

    Example:

    ```python
    lm.fit(data, callbacks=[keras_relora.ReducerCallback()])
    keras_relora.prune(lm, 0.5)          # drop the B of half the blocks
    lm.compile(optimizer=keras.optimizers.AdamW(2e-4), loss=...)
    ```
    """
    state = require_state(model, "`prune`")
    num_blocks = state.num_blocks
    drop_ratio = float_arg(
        "drop_ratio",
        drop_ratio,
        "a float in [0, 1], the fraction of blocks whose B experts are removed",
        lambda v: 0.0 <= v <= 1.0,
    )
    choice_arg("strategy", strategy, STRATEGIES)
    active = np.zeros(num_blocks, dtype=bool)
    for adapter in state.adapters.values():
        if not adapter.pruned:
            active[adapter.block] = True
    target = int(np.floor(drop_ratio * num_blocks + 0.5))
    count = max(0, target - int(num_blocks - active.sum()))
    candidates = np.flatnonzero(active)
    if strategy == "random":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(candidates, count, replace=False)
    else:
        importance = _importance(state, importance)
        order = candidates[np.argsort(importance[candidates], kind="stable")]
        chosen = order[:count]
    chosen = sorted(int(block) for block in chosen)
    for adapter in state.adapters.values():
        if adapter.block in chosen and not adapter.pruned:
            adapter.prune()
    return chosen


def _importance(state, importance):
    num_blocks = state.num_blocks
    if importance is None:
        reducer = state.reducer
        if reducer is None:
            raise ValueError(
                "`prune` with `strategy='importance'` needs block "
                "importance: train with `keras_relora.ReducerCallback` "
                "first, pass `importance=` (an array of one value per "
                "block, higher = more important), or use "
                "`strategy='random'`. Received: importance=None"
            )
        values = -ops.convert_to_numpy(reducer.scores).astype("float64")
        if not np.all(np.isfinite(values)):
            raise ValueError(
                "The learned importance of this model (`-scores` of its "
                "`relora_reducer`) is not finite, so it cannot rank blocks: "
                "pass `importance=` or use `strategy='random'`. "
                f"Received: importance={values!r}"
            )
        return values
    values = np.asarray(importance, dtype="float64")
    if values.shape != (num_blocks,):
        raise ValueError(
            f"`importance` must have one value per block, shape "
            f"({num_blocks},). Received: importance of shape {values.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(
            "`importance` must be finite (NaN or inf cannot be ranked). "
            f"Received: importance={values!r}"
        )
    return values
