"""Exact per-block freezing of B inside the compiled optimizer step.

Keras fixes the trainable variables at `compile()`, and flipping
`trainable` during `fit` breaks JAX and TensorFlow (DESIGN.md §7). A zeroed
gradient is not a freeze either: Adam's moments and weight decay still move
the weight. So `MaskedUpdate` wraps the `apply` method of one optimizer
instance:

```
mask  = update_mask(scores, seed, optimizer.iterations, k)    # (L,) bool
old   = [B, slots of B for every adapter]                     # snapshot
apply(grads)                                                  # as before
B     = where(mask[block], B_new, B_old)    (same for every slot of B)
```

for every B kernel and each of its optimizer slots (Adam/AdamW moments, SGD
momentum, ...), so that an unsampled block's B and slots are bitwise what
they were. Everything the step reads lives in optimizer variables
(`relora_scores`, `relora_control` = `[seed, k, enabled]`, and the
optimizer's own `iterations`): inside the JAX optimizer step the model's
non-trainable variables are stale, the optimizer's are not. The mask is a
function of those variables, so the train function is traced once for the
whole `fit` on JAX and TensorFlow.

`apply` is replaced on the instance: JAX's `stateless_apply` and
TensorFlow's `apply_gradients` call `self.apply`, and torch's trainer calls
`apply` directly, so one wrapper serves every backend. Each change to the
optimizer is a patch of the model's `ReloraState`: `unload` undoes it.
"""

import numpy as np
from keras import ops

from keras_relora.adapt.state import require_state
from keras_relora.reducer import block_sampling

_ATTRIBUTE = "_relora_masked_update"
# Optimizer slots that are not state of the update rule: gradient
# accumulators must keep accumulating (and reset) for frozen blocks too.
_NOT_RESTORED = ("_gradient_accumulator",)


def core_optimizer(optimizer):
    """The optimizer that updates variables (inside a `LossScaleOptimizer`)."""
    return getattr(optimizer, "inner_optimizer", None) or optimizer


class MaskedUpdate:
    """Per-block update masks for the B kernels, on one optimizer instance.

    Use `MaskedUpdate.install(model, adapters, num_blocks)`; it is idempotent
    for the same optimizer and adapters.

    Attributes:
        optimizer: The optimizer whose `apply` is wrapped.
        scores: Optimizer variable, float32 `(L,)`: the scores the step
            samples from (pruned blocks hold a huge score: never drawn).
        control: Optimizer variable, int32 `(3,)`: `[seed, k, enabled]`.
        groups: list of `(block, [B, slot, ...])`.
    """

    def __init__(self, state, optimizer, groups, num_blocks):
        self.state = state
        self.optimizer = optimizer
        self.groups = groups
        self.num_blocks = num_blocks
        self.scores = optimizer.add_variable(
            shape=(num_blocks,),
            initializer="zeros",
            dtype="float32",
            name="relora_scores",
        )
        self.control = optimizer.add_variable(
            shape=(3,),
            initializer="zeros",
            dtype="int32",
            name="relora_control",
        )
        self._original_apply = optimizer.apply
        state.patch(optimizer, "apply", self._apply)
        self._mirrors = {id(self.scores), id(self.control)}

    def exclude_mirrors_from_saving(self, optimizers):
        """Keeps the mirror variables out of the optimizers' saved state.

        The mirrors are rebuilt from the model's Reducer state at every
        `fit` start, so they need no saving; left in, they would make a
        checkpoint's optimizer variables differ in number from those of a
        freshly built optimizer, and Keras then skips loading the
        optimizer state (moments, step counter) with only a warning.
        Files from an optimizer without the Reducer load here and back.
        """
        for optimizer in optimizers:
            if _ATTRIBUTE + "_saving" in optimizer.__dict__:
                continue
            self.state.patch(optimizer, _ATTRIBUTE + "_saving", True)
            self.state.patch(
                optimizer, "save_own_variables", self._saver(optimizer)
            )
            self.state.patch(
                optimizer,
                "load_own_variables",
                self._loader(optimizer, optimizer.load_own_variables),
            )

    def _saved(self, optimizer):
        return [v for v in optimizer.variables if id(v) not in self._mirrors]

    def _saver(self, optimizer):
        def save_own_variables(store):
            for i, variable in enumerate(self._saved(optimizer)):
                store[str(i)] = variable.numpy()

        return save_own_variables

    def _loader(self, optimizer, original):
        def load_own_variables(store):
            saved = self._saved(optimizer)
            if len(store.keys()) != len(saved):
                return original(store)  # Older files, or Keras's warning.
            for i, variable in enumerate(saved):
                variable.assign(store[str(i)])

        return load_own_variables

    @classmethod
    def install(cls, model, adapters, num_blocks):
        """Wraps `model.optimizer` (building it first if needed).

        Args:
            model: A compiled `keras.Model` with ReLoRA adapters.
            adapters: iterable of `ReloraDense`.
            num_blocks: int. `L`.

        Returns:
            `(masked_update, installed)`: the `MaskedUpdate`, and whether it
            was installed now (False when the optimizer already had one for
            the same B kernels).
        """
        state = require_state(model, "`ReducerCallback`")
        optimizer = core_optimizer(model.optimizer)
        trainable = {id(v) for v in model.trainable_variables}
        adapters = [
            a
            for a in adapters
            if getattr(a, "b_kernel", None) is not None
            and id(a.b_kernel) in trainable
        ]
        existing = optimizer.__dict__.get(_ATTRIBUTE)
        if existing is not None:
            known = {id(variables[0]) for _, variables in existing.groups}
            if known == {id(a.b_kernel) for a in adapters}:
                return existing, False
            raise ValueError(
                "This optimizer already masks a different set of B kernels "
                "(the adapters changed, e.g. after `keras_relora.prune`). "
                "Compile the model again with a new optimizer instance, e.g. "
                "`model.compile(optimizer=keras.optimizers.AdamW(...), ...)`."
            )
        if not model.optimizer.built:
            _build(model)
        groups = [
            (a.block, [a.b_kernel] + _slots(optimizer, a.b_kernel))
            for a in adapters
        ]
        masked = cls(state, optimizer, groups, num_blocks)
        masked.exclude_mirrors_from_saving(
            {id(o): o for o in (model.optimizer, optimizer)}.values()
        )
        state.patch(optimizer, _ATTRIBUTE, masked)
        return masked, True

    def set_state(self, scores, active, seed, k, enabled=True):
        """Mirrors the Reducer's state into the optimizer variables.

        On JAX, sync the model's state (read `callback.model`) first.
        """
        self.scores.assign(block_sampling.active_scores(scores, active))
        self.control.assign(np.array([seed, k, int(enabled)], dtype="int32"))

    def set_enabled(self, enabled):
        control = ops.convert_to_numpy(self.control).copy()
        control[2] = int(enabled)
        self.control.assign(control)

    def mask(self):
        """The mask of the current step, bool `(L,)` (all True if off)."""
        control = ops.convert_to_tensor(self.control)
        mask = block_sampling.update_mask(
            ops.convert_to_tensor(self.scores),
            control[0],
            self.optimizer.iterations,
            control[1],
        )
        return ops.logical_or(mask, ops.equal(control[2], 0))

    def _apply(self, grads, trainable_variables=None):
        mask = self.mask()  # from the iteration before the increment
        # `copy`: torch updates variables in place.
        old = [
            [ops.copy(ops.convert_to_tensor(v)) for v in variables]
            for _, variables in self.groups
        ]
        result = self._original_apply(grads, trainable_variables)
        for (block, variables), values in zip(self.groups, old, strict=False):
            keep = mask[block]
            for variable, value in zip(variables, values, strict=False):
                variable.assign(
                    ops.where(keep, ops.convert_to_tensor(variable), value)
                )
        return result


def _slots(optimizer, kernel):
    """The optimizer variables made for `kernel` (`add_variable_from_
    reference` names them `{kernel.path with _}_{slot}`, shaped like it)."""
    prefix = kernel.path.replace("/", "_") + "_"
    return [
        v
        for v in optimizer.variables
        if v.name.startswith(prefix)
        and tuple(v.shape) == tuple(kernel.shape)
        and not v.name.endswith(_NOT_RESTORED)
    ]


def _build(model):
    optimizer = model.optimizer
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    else:
        optimizer.build(model.trainable_variables)
