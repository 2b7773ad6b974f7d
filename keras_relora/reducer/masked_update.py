"""Per-block updates of B inside the compiled optimizer step.

Keras fixes the trainable variables at `compile()`, and flipping
`trainable` during `fit` breaks JAX and TensorFlow. A zeroed gradient is
not a freeze either: Adam's moments and weight decay still move the
weight. So `MaskedUpdate` takes over the update of the B kernels on one
optimizer instance, at the point where `apply` has unscaled, accumulated
and clipped the gradients (`_keras_internals.route_optimizer_update`):

```
mask   = update_mask(scores, seed, optimizer.iterations, k)    # (L,) bool
others -> the optimizer's own update (torch's fused path included)
B      -> t = counts[block] + 1 for the blocks in the mask
          B, m, v = where(mask[block], AdamW step with t, B, m, v)
counts += mask
```

`counts` holds, per block, how many times its B was updated: Adam's bias
correction of a B uses it instead of the optimizer's global step, as torch
AdamW does for a parameter whose `requires_grad` was off (its
`state["step"]` advances only when it gets a gradient). An unselected
block's B, moments and step count are bitwise unchanged, weight decay
included, and no second copy of B or of its moments is made. The rules
known here are Adam and AdamW (`amsgrad` too) and SGD (momentum, Nesterov),
each computed with the optimizer's own formula; any other optimizer gets
a documented fallback: its own update of B, then B and its slots put back
where the mask is off (exact as well, but it keeps a copy of B and its
slots during the step, and a bias correction, if any, uses the global
step).

On torch (without `torch.distributed`), the unselected blocks' B get no
gradient at all: the mask of the next step is known when a step ends, and their
`requires_grad` is switched off before the forward pass, as IST does.

Everything the step reads lives in optimizer variables (`relora_scores`,
`relora_control` = `[seed, k, enabled]`, `relora_update_counts` and the
optimizer's own `iterations`): inside the JAX optimizer step the model's
non-trainable variables are stale, the optimizer's are not. The mask is a
function of those variables, so the train function is traced once for the
whole `fit` on JAX and TensorFlow.

The optimizer's `_backend_update_step` and `_apply_weight_decay` are
replaced on the instance (`_keras_internals.route_optimizer_update`); each
change to the optimizer is a patch of the model's `ReloraState`, so
`unload` undoes it.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_relora import _keras_internals
from keras_relora.adapt.state import require_state
from keras_relora.reducer import block_sampling

_ATTRIBUTE = "_relora_masked_update"
# Optimizer variables made for a kernel that are not state of the update
# rule: gradient accumulators must keep accumulating (and reset) for
# frozen blocks too, and an EMA average follows its own rule.
_NOT_SLOTS = ("_gradient_accumulator", "_average")


def core_optimizer(optimizer):
    """The optimizer that updates variables (inside a `LossScaleOptimizer`)."""
    return getattr(optimizer, "inner_optimizer", None) or optimizer


def update_rule(optimizer):
    """`"adam"`, `"sgd"` or None: the update of B this module computes.

    Adam and AdamW share Keras's `Adam.update_step`; a subclass with its
    own `update_step`, and every other optimizer, gets the fallback (None).
    """
    update_step = getattr(type(optimizer), "update_step", None)
    if update_step is keras.optimizers.Adam.update_step:
        return "adam"
    if update_step is keras.optimizers.SGD.update_step:
        return "sgd"
    return None


class MaskedUpdate:
    """Per-block updates of the B kernels, on one optimizer instance.

    Use `MaskedUpdate.install(model, adapters, num_blocks)`; it is idempotent
    for the same optimizer and adapters.

    Attributes:
        optimizer: The optimizer whose update step is taken over for B.
        rule: `"adam"`, `"sgd"` or None (the fallback, see the module).
        scores: Optimizer variable, float32 `(L,)`: the scores the step
            samples from (pruned blocks hold a huge score: never drawn).
        control: Optimizer variable, int32 `(3,)`: `[seed, k, enabled]`.
        counts: Optimizer variable, int32 `(L,)`: the updates each block's
            B has had with this optimizer (Adam's bias correction of B).
        groups: list of `(block, [B, slot, ...])`.
    """

    def __init__(self, state, optimizer, groups, num_blocks):
        self.state = state
        self.optimizer = optimizer
        self.groups = groups
        self.num_blocks = num_blocks
        self.rule = update_rule(optimizer)
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
        self.counts = optimizer.add_variable(
            shape=(num_blocks,),
            initializer="zeros",
            dtype="int32",
            name="relora_update_counts",
        )
        # Until told otherwise, every B was updated at every step so far.
        self.set_counts(np.full(num_blocks, self.iterations(), "int32"))
        self._kernels = {id(variables[0]) for _, variables in groups}
        self._roles = [
            _roles(self.rule, optimizer, variables) for _, variables in groups
        ]
        self._mirrors = {id(self.scores), id(self.control), id(self.counts)}
        _keras_internals.route_optimizer_update(
            optimizer, self._update_step, self._weight_decay, state.patch
        )

    def iterations(self):
        """The optimizer's step counter, as a Python int."""
        return int(ops.convert_to_numpy(self.optimizer.iterations))

    def set_counts(self, counts):
        """Sets the per-block update counts (int array `(L,)`)."""
        self.counts.assign(np.asarray(counts, dtype="int32"))

    def exclude_mirrors_from_saving(self, optimizers):
        """Keeps the mirror variables out of the optimizers' saved state.

        The scores and control are rebuilt from the model's Reducer state
        at every `fit` start, and the update counts travel with that state
        (`reducer_state`), so the optimizer saves none of them; left in,
        they would make a checkpoint's optimizer variables differ in
        number from those of a freshly built optimizer, and Keras then
        skips loading the optimizer state (moments, step counter) with
        only a warning. Files from an optimizer without the Reducer load
        here and back.
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
        """Takes over the B updates of `model.optimizer` (built if needed).

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
        self._set_gradient_flags(self.optimizer.iterations)

    def set_enabled(self, enabled):
        control = ops.convert_to_numpy(self.control).copy()
        control[2] = int(enabled)
        self.control.assign(control)
        self._set_gradient_flags(self.optimizer.iterations)

    def _set_gradient_flags(self, step):
        """torch: only the B of the blocks of `step` get a gradient.

        The mask of the step to come is known before its forward pass, so
        torch computes no weight gradient for the other blocks' B (as
        IST's `requires_grad=False`); `apply` then receives no gradient
        for them and leaves them, their slots and their weight decay
        alone, which is what the masked update does with them anyway.
        Not once `torch.distributed` is initialised:
        `DistributedDataParallel` expects every parameter to get its
        gradient at every step.
        """
        if not _toggles_gradients():
            return
        mask = ops.convert_to_numpy(self.mask_at(step)).tolist()
        for block, variables in self.groups:
            variables[0].value.requires_grad_(bool(mask[block]))

    def mask(self):
        """The mask of the current step, bool `(L,)` (all True if off)."""
        return self.mask_at(self.optimizer.iterations)

    def mask_at(self, step):
        """The mask of `step`, bool `(L,)` (all True if off)."""
        control = ops.convert_to_tensor(self.control)
        mask = block_sampling.update_mask(
            ops.convert_to_tensor(self.scores), control[0], step, control[1]
        )
        return ops.logical_or(mask, ops.equal(control[2], 0))

    # -- inside the optimizer step -------------------------------------------

    def _weight_decay(self, original, variables):
        # B's decay is part of its masked update: unselected B keep theirs.
        return original([v for v in variables if id(v) not in self._kernels])

    def _update_step(self, original, grads, variables, learning_rate):
        mine = {}
        other_grads, other_variables = [], []
        for grad, variable in zip(grads, variables, strict=True):
            if id(variable) in self._kernels:
                mine[id(variable)] = grad
            else:
                other_grads.append(grad)
                other_variables.append(variable)
        if other_variables:
            original(other_grads, other_variables, learning_rate)
        if not mine:
            return
        with _no_grad():
            mask = self.mask()  # from the iteration before the increment
            if self.rule is None:
                self._fallback_update(original, mine, learning_rate, mask)
            else:
                self._masked_update(mine, learning_rate, mask)
            counts = ops.convert_to_tensor(self.counts)
            _assign_all([(self.counts, counts + ops.cast(mask, "int32"))])
            self._set_gradient_flags(self.optimizer.iterations + 1)

    def _masked_update(self, grads, learning_rate, mask):
        """The optimizer's own formula, per block step count, masked."""
        optimizer = self.optimizer
        present = [
            (group, roles)
            for group, roles in zip(self.groups, self._roles, strict=True)
            if id(group[1][0]) in grads
        ]
        summed = _sum_over_replicas(
            [grads[id(group[1][0])] for group, _ in present]
        )
        lr = ops.cast(learning_rate, "float32")
        if self.rule == "adam":
            beta_1 = ops.cast(optimizer.beta_1, "float32")
            beta_2 = ops.cast(optimizer.beta_2, "float32")
            step = ops.cast(ops.convert_to_tensor(self.counts) + 1, "float32")
            # Keras's Adam: lr * sqrt(1 - b2^t) / (1 - b1^t), t per block.
            alphas = (
                lr
                * ops.sqrt(1 - ops.power(beta_2, step))
                / (1 - ops.power(beta_1, step))
            )  # (L,)
        assignments = []
        for ((block, variables), roles), grad in zip(
            present, summed, strict=True
        ):
            keep = mask[block]
            kernel = variables[0]
            value = ops.convert_to_tensor(kernel)
            grad = ops.cast(grad, kernel.dtype)
            new = {}
            updated = value
            if _keras_internals.uses_weight_decay(optimizer, kernel):
                decay = ops.cast(optimizer.weight_decay, kernel.dtype)
                updated = updated - updated * decay * lr
            if self.rule == "adam":
                m = ops.convert_to_tensor(roles["momentum"])
                v = ops.convert_to_tensor(roles["velocity"])
                # `1 - beta` in Python, as Keras's Adam computes it.
                new["momentum"] = m + (grad - m) * (1 - optimizer.beta_1)
                new["velocity"] = v + (ops.square(grad) - v) * (
                    1 - optimizer.beta_2
                )
                denominator = new["velocity"]
                if "velocity_hat" in roles:
                    v_hat = ops.convert_to_tensor(roles["velocity_hat"])
                    new["velocity_hat"] = ops.maximum(v_hat, denominator)
                    denominator = new["velocity_hat"]
                updated = updated - (new["momentum"] * alphas[block]) / (
                    ops.sqrt(denominator) + optimizer.epsilon
                )
            elif "momentum" in roles:  # SGD with momentum.
                momentum = ops.cast(optimizer.momentum, kernel.dtype)
                m = ops.convert_to_tensor(roles["momentum"])
                new["momentum"] = m * momentum - grad * lr
                if optimizer.nesterov:
                    updated = updated + (new["momentum"] * momentum - grad * lr)
                else:
                    updated = updated + new["momentum"]
            else:  # Plain SGD.
                updated = updated - grad * lr
            assignments.append((kernel, ops.where(keep, updated, value)))
            for role, slot_value in new.items():
                slot = roles[role]
                assignments.append(
                    (
                        slot,
                        ops.where(
                            keep, slot_value, ops.convert_to_tensor(slot)
                        ),
                    )
                )
        _assign_all(assignments)

    def _fallback_update(self, original, grads, learning_rate, mask):
        """Any optimizer: its own update, then put back where mask is off."""
        present = [group for group in self.groups if id(group[1][0]) in grads]
        # `copy`: torch updates variables in place.
        old = [
            [ops.copy(ops.convert_to_tensor(v)) for v in variables]
            for _, variables in present
        ]
        kernels = [variables[0] for _, variables in present]
        optimizer = self.optimizer
        lr = ops.cast(learning_rate, "float32")
        decayed = []
        for kernel in kernels:
            if _keras_internals.uses_weight_decay(optimizer, kernel):
                decay = ops.cast(optimizer.weight_decay, kernel.dtype)
                value = ops.convert_to_tensor(kernel)
                decayed.append((kernel, value - value * decay * lr))
        _assign_all(decayed)
        original([grads[id(k)] for k in kernels], kernels, learning_rate)
        _assign_all(
            [
                (
                    variable,
                    ops.where(
                        mask[block], ops.convert_to_tensor(variable), value
                    ),
                )
                for (block, variables), values in zip(present, old, strict=True)
                for variable, value in zip(variables, values, strict=True)
            ]
        )


def _roles(rule, optimizer, variables):
    """`{slot role: variable}` of one B kernel for the known rules."""
    if rule is None:
        return {}
    kernel, slots = variables[0], variables[1:]
    prefix = kernel.path.replace("/", "_") + "_"
    by_role = {slot.name[len(prefix) :]: slot for slot in slots}
    if rule == "adam":
        roles = ["momentum", "velocity"]
        if optimizer.amsgrad:
            roles.append("velocity_hat")
    else:
        roles = ["momentum"] if optimizer.momentum != 0 else []
    missing = [role for role in roles if role not in by_role]
    if missing:
        raise ValueError(
            f"The optimizer {type(optimizer).__name__} has no {missing} "
            f"variable for {kernel.path}: the Reducer cannot update it. "
            "Compile the model again with a new optimizer instance. "
            f"Received: optimizer variables {sorted(by_role)}"
        )
    return {role: by_role[role] for role in roles}


def _slots(optimizer, kernel):
    """The optimizer variables made for `kernel` (`add_variable_from_
    reference` names them `{kernel.path with _}_{slot}`, shaped like it)."""
    prefix = kernel.path.replace("/", "_") + "_"
    return [
        v
        for v in optimizer.variables
        if v.name.startswith(prefix)
        and tuple(v.shape) == tuple(kernel.shape)
        and not v.name.endswith(_NOT_SLOTS)
    ]


def _build(model):
    optimizer = model.optimizer
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    else:
        optimizer.build(model.trainable_variables)


def _no_grad():
    """torch: no autograd graph for the update (as Keras's own update)."""
    if keras.config.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _toggles_gradients():
    """Whether B's gradients are switched per step (torch, no DDP)."""
    if keras.config.backend() != "torch":
        return False
    import torch.distributed as dist

    # Under `torch.distributed` (a `DistributedDataParallel` even of one
    # process) every parameter must get its gradient at every step.
    return not (dist.is_available() and dist.is_initialized())


def _assign_all(assignments):
    """`variable.assign(value)` for each `(variable, value)` pair.

    Inside a TensorFlow replica context with several replicas (a
    `tf.distribute` strategy), the values (the same on every replica) are
    assigned in one cross-replica merge call, each replica's copy from its
    own value, as Keras's TensorFlow optimizer updates variables; assigning
    a mirrored variable from the replica context would instead reduce each
    value over the replicas one collective at a time.
    """
    if not assignments:
        return
    context = _tf_replica_context()
    if context is None:
        for variable, value in assignments:
            variable.assign(value)
        return
    import tensorflow as tf

    def assign(var, new):
        return var.assign(tf.cast(new, var.dtype))

    def assign_on_each_replica(strategy, values):
        for (variable, _), value in zip(assignments, values, strict=True):
            target = variable.value
            if isinstance(target, tf.distribute.DistributedValues):
                strategy.extended.update(
                    target, assign, args=(value,), group=False
                )
            else:  # One copy (made outside the strategy's scope).
                assign(target, strategy.experimental_local_results(value)[0])

    context.merge_call(
        assign_on_each_replica,
        args=([ops.convert_to_tensor(value) for _, value in assignments],),
    )


def _tf_replica_context():
    """The TensorFlow replica context of several replicas, else None."""
    if keras.config.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _sum_over_replicas(grads):
    """TensorFlow replicas: the gradients summed over them.

    Keras's TensorFlow update step sums the gradients over the replicas of
    a `tf.distribute` strategy itself; the B gradients that bypass it are
    summed here in the same way. JAX and torch hand over summed gradients.
    """
    context = _tf_replica_context()
    if context is None or not grads:
        return grads
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
