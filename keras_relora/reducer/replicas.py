"""The Reducer's probe across replicas and processes: one answer for all.

The update mask of a step is a function of `(scores, seed, step)` only
(`block_sampling.update_mask`), and the probe's trials of `(seed, step,
scores)`; what can differ between replicas is the probe LOSS, when each
replica or process sees a different probe batch. These helpers make it
the loss of the union of the probe batches, so every replica takes the
same decisions, the ones one device would take on the whole batch:

* TensorFlow (`tf.distribute` strategy with several replicas): Keras's
  `predict_on_batch` hands the whole batch to every replica and
  concatenates their outputs (twice the rows on 2 replicas); `predict`
  splits the batch over the replicas and returns each row once.
* torch (`torch.distributed` initialised with several processes, e.g.
  `DistributedDataParallel`): each process probes its own batch, and the
  sums of loss and weight are added over the processes (`all_reduce`), so
  every process gets the mean loss per token of all their batches. The
  callback must run on every process (as DDP's own training loop does).
* JAX (`keras.distribution` over several processes, after
  `keras.distribution.initialize`): each process's `predict_on_batch`
  returns the outputs of its own rows, and the sums are added over the
  processes (`multihost_utils.process_allgather`) in the same way.
"""

import keras
import numpy as np


def predict_batch(model, x):
    """The model's outputs on one probe batch, each row once.

    Args:
        model: The compiled model (a keras-hub task's preprocessor is not
            applied: `x` is already preprocessed).
        x: The batch's inputs.

    Returns:
        The outputs, as Keras's `predict_on_batch` returns them.
    """
    if keras.config.backend() == "tensorflow" and splits_batch(model):
        rows = len(keras.tree.flatten(x)[0])
        return keras.Model.predict(model, x, batch_size=rows, verbose=0)
    return keras.Model.predict_on_batch(model, x)


def splits_batch(model):
    """Whether this process splits a batch across several devices: a
    `tf.distribute` strategy with several replicas (TensorFlow) or a
    `keras.distribution` (JAX). Such a batch is not cut into chunks: a
    chunk may not divide evenly across the devices."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        return strategy is not None and strategy.num_replicas_in_sync > 1
    if backend == "jax":
        return keras.distribution.distribution() is not None
    return False


def sum_across_processes(total, count):
    """`(total, count)` summed over the processes of a multi-process run.

    Args:
        total: float. This process's sum of loss times weight.
        count: float. This process's sum of weights.

    Returns:
        A tuple of two floats: the sums over every process (the inputs
        unchanged in a single process).
    """
    backend = keras.config.backend()
    if backend == "torch":
        return _torch_sum(total, count)
    if backend == "jax":
        return _jax_sum(total, count)
    return total, count


def _torch_sum(total, count):
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return total, count
    if dist.get_world_size() == 1:
        return total, count
    sums = torch.tensor([total, count], dtype=torch.float64)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return float(sums[0]), float(sums[1])


def _jax_sum(total, count):
    import jax

    if jax.process_count() == 1:
        return total, count
    from jax.experimental import multihost_utils

    # float32 on the way (JAX's default): each value travels as a float32
    # and the float32 remainder, and is added up again in float64.
    values = np.array([total, count], dtype="float64")
    high = values.astype("float32")
    low = (values - high).astype("float32")
    gathered = multihost_utils.process_allgather(np.stack([high, low]))
    sums = np.asarray(gathered, dtype="float64").sum(axis=(0, 1))
    return float(sums[0]), float(sums[1])
