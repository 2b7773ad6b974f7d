"""The Reducer's update of B: the optimizer's formula, per-block step counts.

The optimizer of an adapted model gets random gradients for every
trainable variable (`optimizer.apply`, as `fit` calls it), with a seeded
mask schedule of the Reducer. An independent numpy reference implements
Keras's Adam/AdamW/SGD (with clipping, gradient accumulation, loss
scaling, amsgrad and a learning-rate schedule where the case says) and
counts a step per variable: a B advances its moments and step count only
at the steps its block is selected (torch's AdamW with `requires_grad`
off), every other variable at every step. Every variable must match the
reference to 1e-6; an unselected B and its slots must be bitwise what
they were. Then the counts must survive `save_weights` / `load_weights`,
a `.keras` file, and a file written before they existed.
"""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora
from keras_relora.reducer import block_sampling

NUM_BLOCKS = 4
K = 2
SEED = 11


def _numpy(variables):
    return [
        np.array(ops.convert_to_numpy(v), dtype="float64") for v in variables
    ]


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=3, decay_rate=0.5
    )


CASES = {
    "adamw": dict(
        make=lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
        rule="adam",
        lr=0.05,
        wd=0.1,
    ),
    "adam_amsgrad_schedule": dict(
        make=lambda: keras.optimizers.Adam(_schedule(), amsgrad=True),
        rule="adam",
        lr="schedule",
        amsgrad=True,
    ),
    "adamw_global_clipnorm": dict(
        make=lambda: keras.optimizers.AdamW(
            0.05, weight_decay=0.1, global_clipnorm=0.5
        ),
        rule="adam",
        lr=0.05,
        wd=0.1,
        global_clipnorm=0.5,
    ),
    "adam_clipvalue": dict(
        make=lambda: keras.optimizers.Adam(0.05, clipvalue=0.3),
        rule="adam",
        lr=0.05,
        clipvalue=0.3,
    ),
    "adamw_accumulation": dict(
        make=lambda: keras.optimizers.AdamW(
            0.05, weight_decay=0.1, gradient_accumulation_steps=2
        ),
        rule="adam",
        lr=0.05,
        wd=0.1,
        accumulate=2,
    ),
    "loss_scale_adam": dict(
        make=lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.05)
        ),
        rule="adam",
        lr=0.05,
        loss_scale=2.0**15,
    ),
    "sgd_nesterov_decay": dict(
        make=lambda: keras.optimizers.SGD(
            0.05, momentum=0.9, nesterov=True, weight_decay=0.1
        ),
        rule="sgd",
        lr=0.05,
        wd=0.1,
    ),
}


class Reference:
    """Keras's update rules in numpy, with a step count per variable.

    In float32, as the variables are: a float64 reference drifts from any
    float32 implementation by more than 1e-6 within a few Adam steps.
    """

    def __init__(self, case, values):
        self.case = case
        self.values = [v.astype("float32") for v in values]
        self.m = [np.zeros_like(v) for v in values]
        self.v = [np.zeros_like(v) for v in values]
        self.v_hat = [np.zeros_like(v) for v in values]
        self.steps = [0] * len(values)
        self.accumulated = [np.zeros_like(v) for v in values]
        self.micro = 0  # The optimizer's `_iterations`.

    def lr(self):
        if self.case["lr"] == "schedule":
            return np.float32(0.05 * 0.5 ** (self.micro / 3))
        return np.float32(self.case["lr"])

    def apply(self, grads, selected):
        """`selected[i]`: whether variable i updates at this step."""
        case = self.case
        f32 = np.float32  # `grads` are unscaled (loss scaling undone).
        every = case.get("accumulate")
        if every:
            self.accumulated = [
                a + g for a, g in zip(self.accumulated, grads, strict=True)
            ]
            if (self.micro + 1) % every:
                self.micro += 1
                return
            grads = [a / f32(every) for a in self.accumulated]
            self.accumulated = [np.zeros_like(a) for a in self.accumulated]
        if "global_clipnorm" in case:
            norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
            clip = case["global_clipnorm"]
            if norm > clip:
                grads = [g * f32(clip / norm) for g in grads]
        if "clipvalue" in case:
            c = f32(case["clipvalue"])
            grads = [np.clip(g, -c, c) for g in grads]
        lr = self.lr()
        for i, g in enumerate(grads):
            if not selected[i]:
                continue
            x = self.values[i]
            if case.get("wd"):
                x = x - x * f32(case["wd"]) * lr
            if case["rule"] == "adam":
                self.steps[i] += 1
                t = self.steps[i]
                b1, b2 = f32(0.9), f32(0.999)
                # `1 - beta` in float64 and then float32, as Keras does.
                self.m[i] = self.m[i] + (g - self.m[i]) * f32(1 - 0.9)
                self.v[i] = self.v[i] + (g * g - self.v[i]) * f32(1 - 0.999)
                v = self.v[i]
                if case.get("amsgrad"):
                    self.v_hat[i] = np.maximum(self.v_hat[i], v)
                    v = self.v_hat[i]
                alpha = lr * np.sqrt(1 - b2 ** f32(t)) / (1 - b1 ** f32(t))
                x = x - self.m[i] * alpha / (np.sqrt(v) + f32(1e-7))
            else:  # SGD, momentum 0.9, Nesterov.
                mu = f32(0.9)
                self.m[i] = self.m[i] * mu - g * lr
                x = x + (self.m[i] * mu - g * lr)
            self.values[i] = x
        self.micro += 1


def _apply(optimizer, grads, variables):
    """`optimizer.apply` as `fit` runs it (JAX: its stateless form)."""
    grads = [ops.convert_to_tensor(g) for g in grads]
    if keras.config.backend() != "jax":
        optimizer.apply(grads, variables)
        return
    new_values, new_slots = optimizer.stateless_apply(
        [v.value for v in optimizer.variables],
        grads,
        [v.value for v in variables],
    )
    for variable, value in zip(variables, new_values, strict=True):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, new_slots, strict=True):
        variable.assign(value)


def _adapted(optimizer):
    keras.utils.set_random_seed(0)
    model = tm.block_mlp(NUM_BLOCKS)
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    model.compile(optimizer=optimizer, loss="mse")
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_variable_follows_the_numpy_reference(name):
    case = CASES[name]
    model = _adapted(case["make"]())
    reducer = keras_relora.ReducerCallback(update_layers=K, seed=SEED)
    reducer.set_model(model)
    masked = reducer._masked
    assert masked.rule == case["rule"]
    scores = np.array([0.5, -1.0, 2.0, 0.0], "float32")
    masked.set_state(scores, np.ones(NUM_BLOCKS, bool), SEED, K, enabled=True)
    optimizer = model.optimizer
    variables = model.trainable_variables
    kernels = {id(vs[0]): block for block, vs in masked.groups}
    slots = {id(vs[0]): vs[1:] for _, vs in masked.groups}
    assert len(kernels) == NUM_BLOCKS * 1  # One B kernel per adapter.
    reference = Reference(case, _numpy(variables))
    rng = np.random.default_rng(0)
    every = case.get("accumulate", 1)
    counts = np.zeros(NUM_BLOCKS, int)
    for micro in range(16):
        step = micro // every
        mask = ops.convert_to_numpy(
            block_sampling.update_mask(scores, SEED, step, K)
        )
        update = (micro + 1) % every == 0
        grads = [
            rng.normal(size=v.shape).astype("float32") * (1 + micro % 3)
            for v in variables
        ]
        selected = [
            bool(mask[kernels[id(v)]]) if id(v) in kernels else True
            for v in variables
        ]
        before = {
            id(v): _numpy([v, *slots[id(v)]])
            for v in variables
            if id(v) in kernels
        }
        _apply(
            optimizer,
            [g * case.get("loss_scale", 1.0) for g in grads],
            variables,
        )
        reference.apply(grads, selected)
        if update:
            counts += mask
        for v in variables:
            if id(v) in kernels and not (update and mask[kernels[id(v)]]):
                for old, new in zip(
                    before[id(v)], _numpy([v, *slots[id(v)]]), strict=True
                ):
                    np.testing.assert_array_equal(old, new)  # bitwise
        for v, expected in zip(variables, reference.values, strict=True):
            np.testing.assert_allclose(
                ops.convert_to_numpy(v),
                expected,
                rtol=1e-6,
                atol=1e-6,
                err_msg=f"{name}: {v.path} after micro-step {micro}",
            )
    np.testing.assert_array_equal(ops.convert_to_numpy(masked.counts), counts)
    assert 0 < counts.min() and counts.max() < 16 // every  # Uneven.


def test_other_optimizers_fall_back_to_an_exact_freeze():
    # RMSprop is no rule of the Reducer's own: the optimizer updates B, and
    # the unselected blocks' B and slots are put back, bitwise.
    model = _adapted(keras.optimizers.RMSprop(0.01, momentum=0.5))
    reducer = keras_relora.ReducerCallback(update_layers=1, seed=SEED)
    reducer.set_model(model)
    masked = reducer._masked
    assert masked.rule is None
    masked.set_state(np.zeros(4), np.ones(4, bool), SEED, 1, enabled=True)
    variables = model.trainable_variables
    rng = np.random.default_rng(1)
    for step in range(4):
        mask = ops.convert_to_numpy(
            block_sampling.update_mask(np.zeros(4), SEED, step, 1)
        )
        before = [(block, _numpy(vs)) for block, vs in masked.groups]
        _apply(
            model.optimizer,
            [rng.normal(size=v.shape).astype("float32") for v in variables],
            variables,
        )
        for (block, old), (_, vs) in zip(before, masked.groups, strict=True):
            for a, b in zip(old, _numpy(vs), strict=True):
                if mask[block]:
                    assert not np.array_equal(a, b)
                else:
                    np.testing.assert_array_equal(a, b)


def _steps_of(model):
    return int(ops.convert_to_numpy(model.optimizer.iterations))


def _fit(model, callback, x, y, epochs=1):
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )


def test_counts_are_the_sampled_steps_and_survive_saving(tmp_path):
    x, y = tm.dense_data(80)  # 10 steps per epoch.
    model = _adapted(keras.optimizers.AdamW(0.05, weight_decay=0.1))
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=4, seed=3)
    sampled = np.zeros(NUM_BLOCKS, int)

    class Masks(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            model = self.model  # On JAX, syncs the state first.
            masked = reducer._masked
            control = ops.convert_to_numpy(masked.control)
            sampled[:] += ops.convert_to_numpy(
                block_sampling.update_mask(
                    ops.convert_to_numpy(masked.scores),
                    control[0],
                    _steps_of(model),
                    control[1],
                )
            )

    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[reducer, Masks()],
    )
    counts = ops.convert_to_numpy(reducer._masked.counts)
    np.testing.assert_array_equal(counts, sampled)
    np.testing.assert_array_equal(reducer.update_counts, sampled)
    assert counts.sum() == 10  # K=1 of 4 blocks, 10 steps.
    # The model-side copy is refreshed at the end of the fit.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model.relora_reducer.update_counts), counts
    )
    assert int(ops.convert_to_numpy(model.relora_reducer.counts_at)) == 10

    # Another (plain) fit moves every block; a save takes the live counts.
    _fit(model, keras.callbacks.Callback(), x, y)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    resumed = _adapted(keras.optimizers.AdamW(0.05, weight_decay=0.1))
    callback = keras_relora.ReducerCallback(update_layers=1, interval=4)
    callback.set_model(resumed)
    np.testing.assert_array_equal(  # A fresh optimizer: no update yet.
        ops.convert_to_numpy(callback._masked.counts), 0
    )
    resumed.load_weights(path)
    callback._adopt_counts(fresh=False)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(callback._masked.counts), counts + 10
    )
    # Saved counts without the optimizer state they belong to are not
    # used: this optimizer's own step (0) counts for every block.
    fresh = _adapted(keras.optimizers.AdamW(0.05, weight_decay=0.1))
    fresh.optimizer.build(fresh.trainable_variables)
    other = keras_relora.ReducerCallback(update_layers=1)
    other.set_model(fresh)
    fresh.load_weights(path, skip_mismatch=False)
    fresh.optimizer.iterations.assign(0)
    other._adopt_counts(fresh=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(other._masked.counts), 0)


def test_files_from_before_the_counts_load(tmp_path):
    import h5py

    x, y = tm.dense_data(40)
    model = _adapted(keras.optimizers.Adam(0.05))
    _fit(model, keras_relora.ReducerCallback(update_layers=1, seed=2), x, y)
    path = str(tmp_path / "old.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        found = []
        f.visititems(
            lambda name, obj: (
                found.append(name)
                if name.endswith("relora_reducer/vars")
                else None
            )
        )
        assert len(found) == 1
        group = f[found[0]]
        assert sorted(group) == ["0", "1", "2", "3"]
        del group["2"], group["3"]  # As written before the counts.
    scores = ops.convert_to_numpy(model.relora_reducer.scores)
    loaded = _adapted(keras.optimizers.Adam(0.05))
    callback = keras_relora.ReducerCallback(update_layers=1)
    callback.set_model(loaded)
    loaded.load_weights(path)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(loaded.relora_reducer.scores), scores
    )
    callback._adopt_counts(fresh=False)
    # Unknown counts: the optimizer's step for every block (5 steps).
    np.testing.assert_array_equal(
        ops.convert_to_numpy(callback._masked.counts), 5
    )


@pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="torch computes per-parameter gradients on request only",
)
def test_torch_computes_no_gradient_for_unselected_b():
    x, y = tm.dense_data(48)
    model = _adapted(keras.optimizers.AdamW(0.05, weight_decay=0.1))
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=2, seed=5)
    seen = []

    class Gradients(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            masked = reducer._masked
            control = ops.convert_to_numpy(masked.control)
            self.mask = ops.convert_to_numpy(
                block_sampling.update_mask(
                    ops.convert_to_numpy(masked.scores),
                    control[0],
                    _steps_of(self.model),
                    control[1],
                )
            )

        def on_train_batch_end(self, batch, logs=None):
            for block, variables in reducer._masked.groups:
                grad = variables[0].value.grad
                assert (grad is not None) == bool(self.mask[block])
            seen.append(int(self.mask.sum()))

    import warnings

    with warnings.catch_warnings():
        # Keras warns of every variable without a gradient; not of these.
        warnings.filterwarnings("error", message="Gradients do not exist")
        _fit(model, reducer, x, y)
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[reducer, Gradients()],
        )
    assert seen == [1] * 6
    # After the fit, every B gets its gradient again.
    for _, variables in reducer._masked.groups:
        assert variables[0].value.requires_grad
