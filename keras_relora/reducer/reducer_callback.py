"""`ReducerCallback`: the paper's Reducer (§3.2), as a Keras callback."""

import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_relora import _keras_internals
from keras_relora._checks import choice_arg
from keras_relora._checks import float_arg
from keras_relora._checks import int_arg
from keras_relora.adapt.state import require_state
from keras_relora.reducer import block_sampling
from keras_relora.reducer import importance_plot
from keras_relora.reducer import probe_loss
from keras_relora.reducer import replicas
from keras_relora.reducer.masked_update import MaskedUpdate
from keras_relora.reducer.masked_update import core_optimizer
from keras_relora.reducer.probe_data import DEFAULT_PROBE_BATCH
from keras_relora.reducer.probe_data import DEFAULT_PROBE_CHUNK
from keras_relora.reducer.probe_data import ProbeBatches
from keras_relora.reducer.probe_data import take_rows
from keras_relora.reducer.reducer_state import reducer_state


def _check_count(name, value):
    if value is not None:
        int_arg(
            name,
            value,
            1,
            "None (the default fraction of the blocks) or an int >= 1",
        )


PROBE_TOKENS = ("weighted", "all")
# Keras's warning when every variable without a gradient is a B kernel.
_NO_B_GRADIENTS = (
    r"Gradients do not exist for variables \[('[^']*/b_kernel'(, )?)+\] "
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
    experts change. The other blocks' B kernels, their optimizer slots
    (Adam/AdamW moments, momentum) and their weight decay are bitwise
    unchanged; A and routers keep training. With Adam and AdamW, each
    block's B has its own step count for the bias correction: the number
    of times it was updated, as torch's AdamW counts for a parameter with
    `requires_grad=False` (Keras's counts the optimizer's steps). SGD is
    computed the same way (no step count); other optimizers keep B and
    its slots by a copy made during the step, and correct with the
    global step. The mask is computed inside the compiled train step from
    the optimizer's step counter, a seed and the scores, so the train
    function is traced once for the whole `fit`.

    Every `interval` steps, the probe runs `trials` rounds: it samples
    `suppress_layers` blocks with probability proportional to
    `sigmoid(scores)`, scales their adapters' outputs by
    `suppression_factor`, computes the probe loss, and with
    `p = sigmoid(scores)`, rewards `r_k = exp(-loss_k)` centred over the
    trials, adds `score_lr * r̂_k * p_l * (1 - p_l)` to the score of every
    block `l` suppressed in round `k`.

    The probe loss follows IST's code: the model's own loss per counted
    token, `sum(loss * w) / sum(w)` over the loss values of the model's
    compiled loss, on the model's outputs in inference mode. Each probe
    draws a fresh random batch of `probe_batch_size` rows (seeded by the
    Reducer's seed and the probe's number: reproducible, the same on every
    replica and process, and on resume), and all its trials use that
    batch, so that the rewards compare suppression sets rather than
    batches. A probe whose loss is not finite (a NaN in the batch, or
    weights that became NaN) is skipped with a warning; the scores never
    become NaN.

    Which tokens count (`probe_tokens`): `"weighted"` (the default) counts
    the tokens the training loss counts, `w = sample_weight` (every loss
    value without one), so the probe measures how suppressing a block
    hurts the objective being trained. IST probes with its model's own
    training loss too; its default `train_on_inputs=True` trains and
    probes on every token. `"all"` counts every token whatever the sample
    weights (padding excluded where the inputs carry a `padding_mask`, as
    keras-hub's do): IST's probe for a model trained on answers only.

    The scores and the seed live in variables on the model (a small layer
    at the attribute `relora_reducer` of the adapted model), so
    `save_weights`, `.keras` files and adapter checkpoints carry them;
    `save_weights` and `.keras` files also carry the per-block step
    counts. With the optimizer's variables (its step counter and moments),
    a run resumed from a checkpoint takes the same decisions and updates
    as an uninterrupted one. `keras.models.load_model` restores both by
    itself, also for a keras-hub task (whose custom `compile` Keras skips
    on load; the adapted model compiles from the saved config). To resume
    from `save_weights` into a new compiled model, call
    `callback.set_model(model)` before `model.load_weights(path)`: it
    creates the Reducer's variables and builds the optimizer, so that both
    have somewhere to load into.

    A callback belongs to one model at a time: given another model (a
    `fit` of another model), it starts its history, counts and timings
    afresh for that model.

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
        score_lr: float. Step size of the score update, finite and
            positive. Defaults to `10.0`.
        probe_data: Where the probe batches come from, in the form `fit`
            takes (a keras-hub task's preprocessor is applied): a tuple of
            arrays `(x, y)` or `(x, y, sample_weight)` (`x` may be a dict
            of arrays; a keras-hub task with a preprocessor also takes
            `x` alone), from which each probe draws `probe_batch_size`
            random rows; or a re-iterable dataset (`tf.data.Dataset`,
            `PyDataset`, torch `DataLoader`) whose batches are drawn (a
            `PyDataset` in a seeded random order, the others in their own
            order: shuffle them for random batches). Pass held-out data
            here to score blocks on data the model does not train on.
            Defaults to the training data of the latest `fit` call, drawn
            the same way, without the rows `validation_split` holds out
            (arrays or a re-iterable dataset; a generator cannot be shared
            with training and needs `probe_data`).
        probe_batch_size: int. Rows of each probe batch drawn from arrays
            (IST's probe batch). Defaults to `16`.
        probe_chunk_size: None or int. Rows of the probe batch that run
            through the model at a time; the loss sums are added over the
            chunks, so the probe loss is the whole batch's, while the
            probe's peak memory is one chunk's (a causal LM's logits are
            rows x tokens x vocabulary floats: 400 MB for 16 rows of 128
            tokens of SmolLM2). `None` runs the whole batch at once. On
            several devices of one process (a `tf.distribute` strategy
            with several replicas, a `keras.distribution`) the batch runs
            whole, split across the devices. Defaults to `4`.
        probe_tokens: `"weighted"` or `"all"`: the tokens the probe loss
            counts (see above). Defaults to `"weighted"`.
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
        update_counts: numpy int array `(L,)`: the B updates of each block
            during this callback's fits (`steps` each without the Reducer).
        probe_seconds, train_seconds: float. Wall time spent in probes,
            and in this callback's fits (probes included).

    Example:

    ```python
    lm.enable_relora(rank=16, experts=4)
    lm.compile(optimizer=keras.optimizers.AdamW(2e-4), loss=...)
    reducer = keras_relora.ReducerCallback(update_layers=8)
    lm.fit(data, epochs=1, callbacks=[reducer])
    print(reducer.importance)
    reducer.summary()
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
        probe_batch_size=DEFAULT_PROBE_BATCH,
        probe_chunk_size=DEFAULT_PROBE_CHUNK,
        probe_tokens="weighted",
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
            "score_lr",
            score_lr,
            "a finite positive float (the step size of the score update)",
            lambda v: v > 0.0,
        )
        probe_batch_size = int_arg(
            "probe_batch_size",
            probe_batch_size,
            1,
            "an int >= 1 (rows of a probe batch)",
        )
        if probe_chunk_size is not None:
            probe_chunk_size = int_arg(
                "probe_chunk_size",
                probe_chunk_size,
                1,
                "None (the whole probe batch at once) or an int >= 1 (rows "
                "of the probe batch run through the model at a time)",
            )
        choice_arg(
            "probe_tokens",
            probe_tokens,
            PROBE_TOKENS,
            "They are the tokens the probe loss counts.",
        )
        if seed is not None:
            seed = int_arg(
                "seed", seed, 0, "None or an int in [0, 2**31)", 2**31 - 1
            )
        if (
            isinstance(probe_data, (list, tuple))
            and not all(isinstance(item, (str, bytes)) for item in probe_data)
            and not 2 <= len(probe_data) <= 3
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
        self.probe_batch_size = int(probe_batch_size)
        self.probe_chunk_size = probe_chunk_size
        self.probe_tokens = probe_tokens
        self.seed = seed
        self.log_importance = log_importance
        self.verbose = verbose
        self._scores = None
        self._masked = None
        self._probes = None
        self._probe = None  # The latest probe batch.
        self._loss_fn = None
        self._owner = None  # id of the model the results belong to.
        self._filter = None
        self._reset_results()
        self._step = 0
        self._batch_begin = 0

    def _reset_results(self):
        self._steps = []
        self._history = []
        self.skipped_probes = []
        self.probes_run = 0
        self.probe_seconds = 0.0
        self.train_seconds = 0.0
        self.train_steps = 0
        self.update_counts = None

    # -- setup ---------------------------------------------------------------

    def set_model(self, model):
        super().set_model(model)
        state = require_state(model, "`ReducerCallback`")
        if self._owner is not None and self._owner != id(model):
            # Another model: its results must not mix with the last one's.
            self._reset_results()
            self._scores = None
        self._owner = id(model)
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
        self._adopt_counts(fresh=installed)
        self._state.counts_source = self._counts_source(model, masked)

    def _adopt_counts(self, fresh):
        """Takes the per-block update counts from the Reducer state.

        They are valid for this optimizer if it is at the step they were
        saved at (its state was loaded from the same checkpoint). A fresh
        mirror, or loaded counts that do not match, keep the optimizer's
        own step for every block (what a run without the Reducer had).
        """
        state, masked = self._state, self._masked
        if not (fresh or state.counts_loaded):
            return
        iterations = masked.iterations()
        if int(ops.convert_to_numpy(state.counts_at)) == iterations:
            masked.set_counts(ops.convert_to_numpy(state.update_counts))
        elif state.counts_loaded:
            masked.set_counts(np.full(self.num_blocks, iterations, "int32"))
        state.counts_loaded = False

    @staticmethod
    def _counts_source(model, masked):
        def source():
            if core_optimizer(model.optimizer) is not masked.optimizer:
                return None  # Compiled again since: not this optimizer's.
            return ops.convert_to_numpy(masked.counts), masked.iterations()

        return source

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
        self._seed = int(ops.convert_to_numpy(self._state.seed))
        self._probes = ProbeBatches(
            model, self.probe_data, self.probe_batch_size, self._seed
        )
        self._adopt_counts(fresh=False)
        self._masked.set_state(
            self._scores, self._active, self._seed, self._k, enabled=True
        )
        self._step = int(ops.convert_to_numpy(model.optimizer.iterations))
        self._start_step = self._step
        self._start_counts = ops.convert_to_numpy(self._masked.counts).copy()
        if not self._steps:
            self._record()
        self._start_time = time.perf_counter()
        # torch: the unselected blocks' B get no gradient, and Keras warns
        # of every variable without one; not of those B.
        warnings.filterwarnings(
            "ignore", message=_NO_B_GRADIENTS, category=UserWarning
        )
        self._filter = warnings.filters[0]

    def on_train_end(self, logs=None):
        if self._filter in warnings.filters:
            warnings.filters.remove(self._filter)
        self.train_seconds += time.perf_counter() - self._start_time
        _ = self.model  # On JAX, syncs the state before assigning.
        # Without the callback, later fits of the model train every block.
        self._masked.set_enabled(False)
        counts = ops.convert_to_numpy(self._masked.counts).astype("int64")
        done = counts - self._start_counts
        if self.update_counts is None:
            self.update_counts = np.zeros(self.num_blocks, "int64")
        self.update_counts = self.update_counts + done
        self.train_steps += self._masked.iterations() - self._start_step
        # The model-side copy of the counts, as of now (`save_weights`
        # and `.keras` saves refresh it by themselves).
        self._state.update_counts.assign(counts.astype("int32"))
        self._state.counts_at.assign(np.int32(self._masked.iterations()))
        if self.verbose:
            self.summary()

    # -- per step ------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        # Steps run since `on_train_batch_begin` (`steps_per_execution`).
        previous = self._step
        self._step += batch - self._batch_begin + 1
        if self._step // self.interval > previous // self.interval:
            start = time.perf_counter()
            try:
                self._run_probe()
            finally:
                # JAX: the probe's predict left `fit`'s state partial.
                _keras_internals.rebuild_jax_train_state(self.model)
            self.probe_seconds += time.perf_counter() - start

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
        self.probes_run += 1
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
        """The mean loss per counted token of the model on one probe batch.

        `sum(loss * w) / sum(w)` over the values of the compiled loss, with
        `w` the batch's `sample_weight` (`probe_tokens="weighted"`) or its
        inputs' `padding_mask` (`"all"`), or the plain mean without, on
        the model's outputs in inference mode, `probe_chunk_size` rows at a
        time. The compiled predict step computes the outputs: one trace
        per chunk shape on JAX and TensorFlow. Returns a Python float (NaN
        if the weights sum to 0).
        """
        if self.probe_tokens == "all":
            sample_weight = probe_loss.padding_mask(x)
        rows = len(keras.tree.flatten(x)[0])
        chunk = self.probe_chunk_size
        if chunk is None or replicas.splits_batch(self.model):
            chunk = rows
        total = count = 0.0
        for start in range(0, rows, chunk):
            part = np.arange(start, min(start + chunk, rows))
            # Keras's own predict step (`replicas.predict_batch`): a
            # keras-hub task's would run its preprocessor again on the
            # preprocessed batch.
            y_pred = replicas.predict_batch(self.model, take_rows(x, part))
            sums = probe_loss.token_loss_sums(
                self._loss_fn,
                take_rows(y, part),
                y_pred,
                take_rows(sample_weight, part),
            )
            del y_pred  # Before the next chunk's outputs exist.
            total, count = total + sums[0], count + sums[1]
        total, count = replicas.sum_across_processes(total, count)
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

    def summary(self, drop_ratio=0.5, print_fn=None):
        """Prints what the Reducer did and found in this callback's fits.

        The B updates applied (block-steps) against a run without the
        Reducer (every block at every step), the probes run and skipped,
        the probe's measured share of the fits' wall time, the blocks
        ranked by importance, and the blocks `keras_relora.prune(model,
        drop_ratio)` would remove now.

        Args:
            drop_ratio: float in `[0, 1]`. The `prune` ratio to preview.
                Defaults to `0.5`.
            print_fn: callable taking a string, or None for `print`.

        Returns:
            The text, a string.
        """
        float_arg(
            "drop_ratio",
            drop_ratio,
            "a float in [0, 1], the fraction of blocks `prune` removes",
            lambda v: 0.0 <= v <= 1.0,
        )
        if self._scores is None:
            raise ValueError(
                "Nothing to summarise yet: `summary` works after `fit` with "
                "this callback."
            )
        active = int(self._active.sum())
        lines = ["ReducerCallback summary"]
        if self.update_counts is not None and self.train_steps:
            applied = int(self.update_counts.sum())
            plain = self.train_steps * active
            lines.append(
                f"  B updates: {applied} block-steps of {plain} without the "
                f"Reducer ({applied / plain:.1%}; {self.train_steps} steps, "
                f"K={min(self._k, active)} of {active} blocks)"
            )
        skipped = len(self.skipped_probes)
        lines.append(
            f"  probes: {self.probes_run} run, {skipped} skipped "
            f"(non-finite loss), {self.trials} trials each"
        )
        if self.train_seconds > 0:
            lines.append(
                f"  probe time: {self.probe_seconds:.2f} s of "
                f"{self.train_seconds:.2f} s of training "
                f"({self.probe_seconds / self.train_seconds:.1%})"
            )
        importance = self.importance
        order = [
            int(b)
            for b in np.argsort(-importance, kind="stable")
            if self._active[b]
        ]
        lines.append(
            "  blocks by importance (most first): "
            + ", ".join(f"{b} ({importance[b]:.4g})" for b in order)
        )
        removed = _least_important(importance, self._active, drop_ratio)
        lines.append(
            f"  prune(model, {drop_ratio:g}) would remove the B experts of "
            f"blocks {removed}"
        )
        text = "\n".join(lines)
        (print_fn or print)(text)
        return text

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


def _least_important(importance, active, drop_ratio):
    """The blocks `prune(model, drop_ratio)` removes (its own rule)."""
    num_blocks = len(active)
    target = int(np.floor(drop_ratio * num_blocks + 0.5))
    count = max(0, target - int(num_blocks - active.sum()))
    candidates = np.flatnonzero(active)
    order = candidates[np.argsort(importance[candidates], kind="stable")]
    return sorted(int(block) for block in order[:count])
