"""`ReducerCallback`: the paper's Reducer (§3.2), as a Keras callback."""

import warnings

import keras
import numpy as np
from keras import ops

from keras_relora._checks import float_arg
from keras_relora._checks import int_arg
from keras_relora.adapt.state import require_state
from keras_relora.reducer import block_sampling
from keras_relora.reducer import importance_plot
from keras_relora.reducer import probe_loss
from keras_relora.reducer import replicas
from keras_relora.reducer.masked_update import MaskedUpdate
from keras_relora.reducer.probe_data import ProbeBatches
from keras_relora.reducer.reducer_state import reducer_state


def _check_count(name, value):
    if value is not None:
        int_arg(
            name,
            value,
            1,
            "None (the default fraction of the blocks) or an int >= 1",
        )


class ReducerCallback(keras.callbacks.Callback):
    """Learns block importance and updates only `K` blocks' B each step.

    The Reducer of ReLoRA ("Less is more: resource-efficient low-rank
    adaptation", §3.2), with IST's score rule (Yao et al. 2024). The units
    are the `L` blocks of a model adapted by `enable_relora`; `scores` (L,)
    start at zero and a high score means "suppressing this block barely
    hurt". Users see `importance = -scores`.

    Every step, `K = update_layers` blocks are sampled without replacement
    with probability proportional to `sigmoid(-scores)`; only their B
    experts change. The other blocks' B kernels and their optimizer slots
    (Adam/AdamW moments, momentum) are bitwise unchanged; A and routers keep
    training. The mask is computed inside the compiled train step from the
    optimizer's step counter, a seed and the scores, so the train function
    is traced once for the whole `fit`.

    Every `interval` steps, the probe runs `trials` rounds: it samples
    `suppress_layers` blocks with probability proportional to
    `sigmoid(scores)`, scales their adapters' outputs by
    `suppression_factor`, computes the probe loss, and with
    `p = sigmoid(scores)`, rewards `r_k = exp(-loss_k)` centred over the
    trials, adds `score_lr * r̂_k * p_l * (1 - p_l)` to the score of every
    block `l` suppressed in round `k`.

    The probe loss follows IST's code: the mean loss per target token,
    `sum(loss * sample_weight) / sum(sample_weight)` over the loss values
    of the model's compiled loss (the plain mean without a
    `sample_weight`), on the model's outputs in inference mode. Each probe
    draws a fresh batch, and all its trials use that batch, so that the
    rewards compare suppression sets rather than batches. A probe whose
    loss is not finite (a NaN in the batch, or weights that became NaN) is
    skipped with a warning; the scores never become NaN.

    The scores and the seed live in variables on the model (a small layer
    at the attribute `relora_reducer` of the adapted model), so
    `save_weights`, `.keras` files and adapter checkpoints carry them;
    with the optimizer's variables (its step counter and moments), a run
    resumed from a checkpoint takes the same decisions as an uninterrupted
    one. `keras.models.load_model` restores both by itself, also for a
    keras-hub task (whose custom `compile` Keras skips on load; the
    adapted model compiles from the saved config). To resume from
    `save_weights` into a new compiled model, call
    `callback.set_model(model)` before `model.load_weights(path)`: it
    creates the Reducer's variables and builds the optimizer, so that both
    have somewhere to load into.

    Args:
        update_layers: int. `K`, the blocks whose B is updated each step.
            Defaults to `max(1, L // 4)`.
        suppress_layers: int. Blocks suppressed in each probe trial.
            Defaults to `max(1, L // 2)`.
        interval: int. Training steps between probes. Defaults to `10`.
        trials: int. Probe trials per probe, at least 2 (the rewards are
            centred over them). Defaults to `3`.
        suppression_factor: float in `[0, 1)`. Scale of a suppressed
            block's adapter outputs. Defaults to `0.25`.
        score_lr: float. Step size of the score update. Defaults to `10.0`.
        probe_data: Where the probe batches come from, in the form `fit`
            takes (a keras-hub task's preprocessor is applied): a tuple of
            arrays `(x, y)` or `(x, y, sample_weight)`, from which
            successive slices of the `fit` call's `batch_size` rows (32 if
            it has none) are drawn, wrapping around at the end; or a
            re-iterable dataset (`tf.data.Dataset`, `PyDataset`, torch
            `DataLoader`) whose successive batches are drawn, from its start
            again when exhausted. Probe `i` (counted from the start of
            training, so a resumed run probes what an uninterrupted one
            would) uses batch `i mod n`. Pass held-out data here to score
            blocks on data the model does not train on. Defaults to the
            training data of the latest `fit` call, drawn the same way
            (when it is arrays or a re-iterable dataset; a generator cannot
            be shared with training and needs `probe_data`).
        seed: int. Seed of the sampling, stored with the model's Reducer
            state when that state is created; a model that already has one
            (an earlier `fit`, a loaded checkpoint) keeps its seed. Defaults
            to a seed drawn from numpy's global generator (which
            `keras.utils.set_random_seed` seeds).
        log_importance: bool. Add `relora_importance_{l}` to the epoch logs
            (so `History` and a `TensorBoard` callback placed after this one
            record them). Defaults to `True`.
        verbose: int. `1` prints each probe's losses and importance.
            Defaults to `0`.

    Attributes:
        importance: numpy array `(L,)`, `-scores`: higher is more important.
        skipped_probes: list of the training steps whose probe was skipped
            because a probe loss was not finite.
        importance_history: `(steps, importance)`: int array `(T,)` and
            float array `(T, L)`, one row per probe (and the start).

    Example:

    ```python
    lm.enable_relora(rank=16, experts=4)
    lm.compile(optimizer=keras.optimizers.AdamW(2e-4), loss=...)
    reducer = keras_relora.ReducerCallback(update_layers=8)
    lm.fit(data, epochs=1, callbacks=[reducer])
    print(reducer.importance)
    reducer.plot("importance.png")
    ```
    """

    def __init__(
        self,
        update_layers=None,
        *,
        suppress_layers=None,
        interval=10,
        trials=3,
        suppression_factor=0.25,
        score_lr=10.0,
        probe_data=None,
        seed=None,
        log_importance=True,
        verbose=0,
    ):
        super().__init__()
        _check_count("update_layers", update_layers)
        _check_count("suppress_layers", suppress_layers)
        interval = int_arg(
            "interval",
            interval,
            1,
            "an int >= 1 (training steps between probes)",
        )
        trials = int_arg(
            "trials",
            trials,
            2,
            "an int >= 2: the rewards are centred over the trials, so a "
            "single trial never changes a score",
        )
        suppression_factor = float_arg(
            "suppression_factor",
            suppression_factor,
            "a float in [0, 1) (1 would not suppress anything)",
            lambda v: 0.0 <= v < 1.0,
        )
        score_lr = float_arg(
            "score_lr", score_lr, "a positive float", lambda v: v > 0
        )
        if seed is not None:
            seed = int_arg(
                "seed", seed, 0, "None or an int in [0, 2**31)", 2**31 - 1
            )
        if isinstance(probe_data, (list, tuple)) and not (
            2 <= len(probe_data) <= 3
        ):
            raise ValueError(
                "`probe_data` must be `(x, y)`, `(x, y, sample_weight)` or a "
                f"dataset. Received: probe_data of length {len(probe_data)}"
            )
        self.update_layers = update_layers
        self.suppress_layers = suppress_layers
        self.interval = int(interval)
        self.trials = int(trials)
        self.suppression_factor = float(suppression_factor)
        self.score_lr = float(score_lr)
        self.probe_data = probe_data
        self.seed = seed
        self.log_importance = log_importance
        self.verbose = verbose
        self._scores = None
        self._steps = []
        self._history = []
        self._masked = None
        self._probes = None
        self._probe = None  # The latest probe batch.
        self._loss_fn = None
        self.skipped_probes = []
        self._step = 0
        self._batch_begin = 0

    # -- setup ---------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        state = require_state(model, "`ReducerCallback`")
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                "`ReducerCallback` needs a compiled model: call "
                "`model.compile(optimizer=..., loss=...)` first."
            )
        num_blocks = state.num_blocks
        self.num_blocks = num_blocks
        self._k = self._resolve(
            "update_layers",
            self.update_layers,
            max(1, num_blocks // 4),
            num_blocks,
        )
        self._m = self._resolve(
            "suppress_layers",
            self.suppress_layers,
            max(1, num_blocks // 2),
            num_blocks,
        )
        self._adapters = list(state.adapters.values())
        self._active = np.zeros(num_blocks, dtype=bool)
        for adapter in self._adapters:
            if getattr(adapter, "b_kernel", None) is not None:
                self._active[adapter.block] = True
        if not self._active.any():
            raise ValueError(
                "`ReducerCallback` has no block to sample: every block's B "
                "experts were pruned (`keras_relora.prune`), so there is no "
                "B to update or to probe. Train without the callback. "
                f"Received: 0 of {num_blocks} blocks with B experts"
            )
        if self._k > self._active.sum():
            warnings.warn(
                f"`update_layers`={self._k} is not less than the "
                f"{int(self._active.sum())} blocks that still have B "
                "experts (the others were pruned): every block updates "
                "every step.",
                stacklevel=2,
            )
        self._state = reducer_state(model)
        if self._state is None:
            seed = self.seed
            if seed is None:
                # numpy's global RNG: `keras.utils.set_random_seed` seeds it.
                seed = int(np.random.randint(0, 2**31 - 1))
            self._state = reducer_state(model, create_seed=seed)
        self._scores = self._read_scores()
        masked, installed = MaskedUpdate.install(
            model, self._adapters, num_blocks
        )
        self._masked = masked
        if installed:
            # A train function made before the optimizer was wrapped (e.g.
            # by an earlier `fit` without this callback) would not mask.
            model.train_function = None

    def _resolve(self, name, value, default, num_blocks):
        if value is None:
            return default
        if value > num_blocks:
            raise ValueError(
                f"`{name}` cannot exceed the number of blocks of the model, "
                f"L={num_blocks}. Pass `{name}` <= {num_blocks}, or None for "
                f"the default. Received: {name}={value}"
            )
        return int(value)

    def _read_scores(self):
        scores = ops.convert_to_numpy(self._state.scores).copy()
        if not np.all(np.isfinite(scores)):
            raise ValueError(
                "The Reducer's stored scores (`relora_reducer/scores`) are "
                "not finite, so no block can be sampled from them. Load a "
                "checkpoint with finite scores or assign zeros to "
                f"`relora_reducer.scores`. Received: scores={scores!r}"
            )
        return scores

    def on_train_begin(self, logs=None):
        model = self.model  # On JAX, reading `self.model` syncs its state.
        # Everything that can refuse runs before any state changes.
        self._scores = self._read_scores()
        self._loss_fn = probe_loss.loss_function(model)
        self._probes = ProbeBatches(model, self.probe_data)
        self._seed = int(ops.convert_to_numpy(self._state.seed))
        self._masked.set_state(
            self._scores, self._active, self._seed, self._k, enabled=True
        )
        self._step = int(ops.convert_to_numpy(model.optimizer.iterations))
        if not self._steps:
            self._record()

    def on_train_end(self, logs=None):
        _ = self.model  # On JAX, syncs the state before assigning.
        # Without the callback, later fits of the model train every block.
        self._masked.set_enabled(False)

    # -- per step ------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        # Steps run since `on_train_batch_begin` (`steps_per_execution`).
        previous = self._step
        self._step += batch - self._batch_begin + 1
        if self._step // self.interval > previous // self.interval:
            self._run_probe()

    def on_epoch_end(self, epoch, logs=None):
        if self.log_importance and logs is not None:
            for block, value in enumerate(self.importance):
                logs[f"relora_importance_{block}"] = float(value)

    # -- the probe -----------------------------------------------------------

    def _run_probe(self):
        _ = self.model  # Sync the JAX state before assigning.
        rng = np.random.default_rng([self._seed, self._step])
        suppressed = block_sampling.suppressed_blocks(
            self._scores, self._m, self.trials, rng, self._active
        )
        # A fresh batch for each probe, the same for all of its trials (so
        # that the rewards compare suppression sets, not batches).
        self._probe = self._probes.batch(self._step // self.interval - 1)
        losses = []
        # Blocks whose adapters hold the suppression factor now: each trial
        # assigns only the adapters whose factor changes.
        current = set()
        try:
            for blocks in suppressed:
                chosen = {int(b) for b in blocks}
                restore, suppress = current - chosen, chosen - current
                # While assigning, any of both sets may hold the factor:
                # `finally` restores them all if an assignment fails.
                current = current | chosen
                self._set_suppressed(restore, 1.0)
                self._set_suppressed(suppress, self.suppression_factor)
                current = chosen
                losses.append(self._probe_loss(*self._probe))
        finally:
            self._set_suppressed(current, 1.0)
        if not np.all(np.isfinite(losses)):
            self.skipped_probes.append(self._step)
            warnings.warn(
                f"Reducer step {self._step}: non-finite probe loss "
                f"{losses}; this probe was skipped and the scores keep "
                "their values. A NaN in the probe batch or in the model's "
                "weights (a diverged training loss) causes this.",
                stacklevel=2,
            )
            return
        self._scores = block_sampling.update_scores(
            self._scores, suppressed, losses, self.score_lr
        )
        self._state.scores.assign(self._scores)
        self._masked.set_state(
            self._scores, self._active, self._seed, self._k, enabled=True
        )
        self._record()
        if self.verbose:
            importance = self.importance.astype("float64")
            print(
                f"\nReducer step {self._step}: probe losses "
                f"{np.round(losses, 4).tolist()}, importance "
                f"{np.round(importance, 4).tolist()}"
            )

    def _probe_loss(self, x, y, sample_weight):
        """The mean loss per target token of the model on one probe batch.

        `sum(loss * sample_weight) / sum(sample_weight)` over the values of
        the compiled loss (their plain mean without `sample_weight`), on
        the model's outputs in inference mode. The compiled predict step
        computes the outputs: one trace per batch shape on JAX and
        TensorFlow. Returns a Python float (NaN if the weights sum to 0).
        """
        # Keras's own predict step (`replicas.predict_batch`): a keras-hub
        # task's would run its preprocessor again on the preprocessed batch.
        y_pred = replicas.predict_batch(self.model, x)
        sums = probe_loss.token_loss_sums(
            self._loss_fn, y, y_pred, sample_weight
        )
        total, count = replicas.sum_across_processes(*sums)
        return total / count if count > 0 else float("nan")

    def _set_suppressed(self, blocks, factor):
        for adapter in self._adapters:
            if adapter.block in blocks:
                adapter.suppression.assign(factor)

    # -- results -------------------------------------------------------------

    def _record(self):
        self._steps.append(self._step)
        self._history.append(self.importance)

    @property
    def importance(self):
        if self._scores is None:
            return None
        return -np.asarray(self._scores, dtype="float32")

    @property
    def importance_history(self):
        return (
            np.asarray(self._steps, dtype="int64"),
            np.asarray(self._history, dtype="float32").reshape(
                len(self._steps), -1
            ),
        )

    def plot(self, path):
        """Writes a heat map of the importance (block x step) to `path`.

        Needs matplotlib (`pip install keras-relora[plot]`).

        Args:
            path: str. The image file to write, e.g. `"importance.png"`.

        Returns:
            The matplotlib `Figure`.
        """
        steps, importance = self.importance_history
        if not len(steps):
            raise ValueError(
                "No importance recorded yet: `plot` works after `fit` with "
                "this callback."
            )
        return importance_plot.heat_map(steps, importance, path)
