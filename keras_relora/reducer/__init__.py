"""The Reducer (paper §3.2): block scores, sampling, the per-block update
of B in the optimizer step, and static pruning.

The rule is IST's (Yao et al. 2024, "Layer-wise Importance Matters";
reference code `ist.py` and `finetune.py` of
antgroup/importance-aware-sparse-tuning-IST-paper). Read against that code:

What matches:

* The score rule, line for line: scores start at 0; every 10 steps, 3
  trials each suppress `L/2` blocks drawn without replacement with
  probability proportional to `sigmoid(scores)`, by scaling their adapter
  outputs by 0.25; rewards `exp(-loss)` are centred over the trials; each
  suppressed block's score moves by `10 * r̂ * p * (1 - p)`. Every step
  `L/4` blocks are drawn with probability proportional to
  `sigmoid(-scores)`, and only those blocks train.
* The probe batch: a fresh random batch of 16 rows of the training data
  for every probe, the rows shuffled pass after pass (IST: a shuffled
  `DataLoader`, batch 16, re-created when exhausted), the model in
  inference mode, the loss the model trains on.
* The optimizer state of a frozen block: IST sets `requires_grad=False`
  on the adapters of unselected layers, so torch's AdamW leaves their
  moments and step counts alone and skips their weight decay; here an
  unselected block's B, moments, weight decay and step count are bitwise
  unchanged, and Adam's bias correction of a B uses the times that B was
  updated.

What differs, and why:

* What freezes: IST freezes every adapter parameter of an unselected
  layer. Here A is shared by the blocks (one per role) and trains at
  every step, as do the routers; what a block owns, its B experts, is
  what freezes. Freezing a shared A with any one of its blocks would
  freeze it almost always.
* Where the sampling runs: IST draws with `torch.multinomial` on the host
  from torch's global generator. The update set here is drawn inside the
  compiled train step (Gumbel top-k, the same distribution) from a hash of
  `(seed, step)`, so that `fit` traces once, every replica and process
  takes the same decision, and a resumed run the same as an
  uninterrupted one; the probe's draws are seeded numpy draws. IST draws
  a trial again when it repeats an earlier trial's set; here trials are
  independent (a repeat, rare with more than a few blocks, gives two
  trials the same reward and so no signal between them).
* Which tokens the probe counts: IST's probe loss is its training loss,
  over the tokens with a label (`train_on_inputs=True`, its default:
  every non-padding token). Here `probe_tokens="weighted"` (the default)
  counts the tokens the training loss counts (its `sample_weight`), which
  is the same rule; `"all"` counts every non-padding token even when
  training counts the answers only.
* The probe batch's memory: IST's probe runs its 16 rows at once; here
  they run `probe_chunk_size` rows at a time (default 4) and the loss
  sums are added over the chunks: the same loss, at the peak memory of a
  4-row forward pass.
* Datasets: a `tf.data.Dataset` or torch `DataLoader` given as probe (or
  training) data is read in its own order and batch size (IST's own
  loader shuffles; shuffle yours).
* Adam's epsilon: Keras's Adam adds `epsilon` to `sqrt(v)` before the
  bias correction of `v` (torch adds it after); Keras's AdamW defaults
  (`weight_decay=0.004`, `epsilon=1e-7`) differ from torch's (0.01,
  1e-8). The Reducer computes Keras's formula, so that a block updated at
  every step follows exactly what Keras's own optimizer would do.
* Defaults for small models: `K = max(1, L // 4)` and
  `max(1, L // 2)` suppressed blocks (IST's `int(L * 0.25)` is 0 below 4
  layers).
"""

from keras_relora.reducer.prune import prune
from keras_relora.reducer.reducer_callback import ReducerCallback

__all__ = [
    "ReducerCallback",
    "prune",
]
