"""Ground truth for the Reducer's importance: blocks planted in a teacher.

A tiny Llama "teacher" is a frozen base plus non-zero adapters in two known
blocks (1 and 4 of 6) only. A "student" (the same base, with the teacher's
A and every B at zero, so that it can represent the teacher exactly) learns
the teacher's logits (MSE) with `ReducerCallback`. Each layer has its own
frozen random A (`share_a="layer"`): with one A shared by the blocks,
the student spread the teacher's change over neighbouring blocks (whose
inputs are close in the residual stream), and no block was the truth any
more. The test states what the paper claims of the importance scores
(Figure 5), on a case where the answer is known:

* the two planted blocks have the two highest importances, for each of 3
  seeds (each seed: another base, another planted B, other data, another
  Reducer seed);
* `prune` of the 4 least important blocks removes exactly the unplanted
  ones and keeps the student's fit: the loss rises by at most 35% of what
  training gained (`base - trained`, `base` = the loss with every B zero;
  seen: 3-22% over the three backends);
* without the planted blocks' B (the student's own, zeroed, which is what
  `prune` of those blocks leaves), at least 50% of the gain is lost (seen:
  60-85%).

Every block's B updates at every step (`update_layers=6`): the student fits
the teacher whichever blocks the sampler would have chosen early, and the
test measures what the scores find. With the score update's sign flipped
(`block_sampling.update_scores`), every seed fails: the planted blocks
ranked lowest (checked by hand on torch).
"""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_models
from keras import ops

import keras_relora

NUM_BLOCKS = 6
PLANTED = (1, 4)


def logits_mse(model, x, teacher):
    prediction = ops.convert_to_numpy(model.predict_on_batch(x))
    return float(np.mean((prediction - teacher) ** 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_finds_the_planted_blocks(seed):
    keras.utils.set_random_seed(seed)
    backbone = tiny_models.llama3_backbone(
        num_layers=NUM_BLOCKS, hidden_dim=32, tie_word_embeddings=True
    )
    # Larger embeddings give logits of order 1 (the default init gives
    # logits of ~1e-2, and an MSE too small to learn in a few steps).
    embeddings = backbone.token_embedding.embeddings
    embeddings.assign(ops.convert_to_numpy(embeddings) * 50.0)
    lm = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    lm.enable_relora(rank=2, experts=1, share_a="layer", train_a=False)
    adapters = list(keras_relora.get_state(lm).adapters.values())
    rng = np.random.default_rng(seed)
    for adapter in adapters:
        if adapter.block in PLANTED:
            shape = tuple(adapter.b_kernel.shape)
            adapter.b_kernel.assign(rng.normal(size=shape).astype("float32"))
    x = tiny_models.token_batch(batch=64, seq=8, seed=seed)
    teacher = ops.convert_to_numpy(lm.predict_on_batch(x))
    for adapter in adapters:  # The student: the same A, every B zero.
        adapter.b_kernel.assign(np.zeros(adapter.b_kernel.shape, "float32"))
    base = logits_mse(lm, x, teacher)

    lm.compile(
        optimizer=keras.optimizers.Adam(0.05), loss="mse", weighted_metrics=[]
    )
    reducer = keras_relora.ReducerCallback(
        update_layers=NUM_BLOCKS,
        interval=2,
        seed=seed,
        # Each trial's 16 rows in one call, not in 4-row chunks: the same
        # probe loss (tests/unit/test_reducer_probe_batches.py) in a
        # quarter of the calls.
        probe_chunk_size=None,
    )
    lm.fit(x, teacher, batch_size=64, epochs=40, verbose=0, callbacks=[reducer])
    trained = logits_mse(lm, x, teacher)
    gain = base - trained
    assert gain > 0.8 * base  # The student learned the teacher.

    importance = reducer.importance
    ranking = np.argsort(-importance)
    assert sorted(ranking[:2].tolist()) == list(PLANTED), importance

    learned = [ops.convert_to_numpy(a.b_kernel).copy() for a in adapters]
    for adapter, b in zip(adapters, learned, strict=False):
        if adapter.block in PLANTED:
            adapter.b_kernel.assign(np.zeros_like(b))
    without_planted = logits_mse(lm, x, teacher)
    for adapter, b in zip(adapters, learned, strict=False):
        adapter.b_kernel.assign(b)
    assert without_planted - trained >= 0.5 * gain

    unplanted = [b for b in range(NUM_BLOCKS) if b not in PLANTED]
    assert keras_relora.prune(lm, 4 / NUM_BLOCKS) == unplanted
    assert logits_mse(lm, x, teacher) - trained <= 0.35 * gain
