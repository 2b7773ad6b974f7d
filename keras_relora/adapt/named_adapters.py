"""Several named adapters on one model: add, switch, disable, delete.

`enable_relora(model, ..., adapter_name=name)` adds an adapter under a
name; each adapted layer keeps one `ReloraDense` per adapter that targets
it (the adapter "default" at the attribute `relora`, as a model with one
adapter always had; any other at `relora_<name>`) and a registry of them
(`REGISTRY`), which its patched `call` reads (`adapters_call`).

How the active adapter is selected: with two adapters or more, one
`AdapterSelector` (a non-trainable float32 vector `mix`, one entry per
adapter name, shared by every adapted layer) weights each adapter's
output: `y = base + sum_n mix[n] * delta_n`. `set_adapter` assigns a
one-hot vector to `mix`, so that a compiled predict or train function
(JAX, TensorFlow) reads the new value and is not traced again; on torch it
is an in-place copy. With weights 1 and 0 the output is bitwise the active
adapter's alone (`x * 1 == x`, `x + 0 == x`). Every adapter still
computes its delta: the forward pass costs the sum of the adapters.

How the inactive adapters stay frozen: every adapter's variables stay
trainable (changing the trainable set would change, and retrace, the
compiled train step, and need a new optimizer). Their gradients are zero,
but Adam's moments and weight decay would still move them, so at `fit`
start an `AdapterMask` wraps the optimizer's `apply` and puts back every
variable (and optimizer slot) of the adapters whose `mix` entry is 0,
bitwise. The mask is an optimizer variable (the model's non-trainable
variables are stale inside JAX's optimizer step), synced from `mix` at
every `fit` start.

A model with one adapter has no selector (its variables and files are
those of a model that never had names); `disable_adapters` then sets a
Python flag and drops the compiled functions, which trace again.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_relora import _keras_internals
from keras_relora.adapt.model_class import refresh_torch_parameters
from keras_relora.adapt.state import adapted_model
from keras_relora.adapt.state import holders
from keras_relora.adapt.state import require_state

# The attribute of an adapted layer holding `{name: ReloraDense}`.
REGISTRY = "_relora_named"
# Attribute of every adapted layer holding the shared `AdapterSelector`.
SELECTOR_ATTRIBUTE = "relora_selector"
_MASK_ATTRIBUTE = "_relora_adapter_mask"
# Shared with `reducer.masked_update`: the optimizer's saving is patched
# once, and leaves out every `relora_*` mirror variable.
_SAVING_ATTRIBUTE = "_relora_masked_update_saving"
_MIRROR_PREFIX = "relora_"
_NOT_RESTORED = ("_gradient_accumulator",)


def check_adapter_name(name):
    """Raises unless `name` is a str that is a Python identifier."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            "`adapter_name` must be a str that is a Python identifier "
            "(letters, digits and `_`, not starting with a digit), e.g. "
            f"`adapter_name='sst2'`. Received: adapter_name={name!r}"
        )
    return name


def suffix(name):
    """`""` for "default" (the single-adapter layout), else `_<name>`."""
    return "" if name == "default" else f"_{name}"


@keras.saving.register_keras_serializable(package="keras_relora")
class AdapterSelector(keras.layers.Layer):
    """The weight of each named adapter's output, `mix` `(count,)`.

    Non-trainable and shared by every adapted layer of a model;
    `set_adapter` writes a one-hot vector into it.

    Args:
        count: int. The number of adapter names.
        **kwargs: Base layer keyword arguments, such as `name`.
    """

    def __init__(self, count, **kwargs):
        super().__init__(**kwargs)
        self.count = int(count)
        self.mix = self.add_weight(
            name="mix",
            shape=(self.count,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )
        self.built = True

    def get_config(self):
        return {**super().get_config(), "count": self.count}


def _activation(layer, outputs):
    if layer.activation in (None, keras.activations.linear):
        return outputs
    return layer.activation(outputs)


def adapters_call(state, layer, inputs, base, training):
    """The patched call's output: `base` plus the layer's adapters'."""
    registry = layer.__dict__.get(REGISTRY) or {}
    weights = state.example_weights
    if weights is None and state.selector is None:
        if state.disabled or not registry:
            return _activation(layer, base)
        (adapter,) = registry.values()
        return adapter(inputs, base, training=training)
    if weights is None:
        weights = ops.convert_to_tensor(state.selector.mix)
    names = list(state.named)
    outputs = base
    for name, adapter in registry.items():
        if adapter.pruned:
            continue
        weight = weights[..., names.index(name)]
        delta = adapter.delta(
            inputs, training=training, loss_weight=ops.mean(weight)
        )
        if len(weight.shape) == 1:  # One weight per example.
            _check_batch(weight, delta)
            weight = ops.reshape(weight, (-1,) + (1,) * (len(delta.shape) - 1))
        delta = delta * ops.cast(weight, delta.dtype)
        outputs = outputs + ops.cast(delta, outputs.dtype)
    return _activation(layer, outputs)


def _check_batch(weight, delta):
    rows, batch = weight.shape[0], delta.shape[0]
    if rows is not None and batch is not None and rows != batch:
        raise ValueError(
            "`adapter_ids` of `route_examples` has one entry per example, "
            f"but the batch has {batch} examples and `adapter_ids` {rows}. "
            "Call the model on one batch of that size (e.g. "
            "`model.predict(x, batch_size=len(adapter_ids))`). "
            f"Received: adapter_ids of length {rows}"
        )


def _adapted_layers(state):
    layers = {}
    for group in state.named.values():
        for adapter in group.adapters.values():
            layers.setdefault(id(adapter._base_layer), adapter._base_layer)
    return list(layers.values())


def _one_hot(state, name):
    mix = np.zeros((len(state.named),), dtype="float32")
    mix[list(state.named).index(name)] = 1.0
    return mix


def _set_selector(model, state):
    """Gives every adapted layer a selector sized for `state.named` (none
    with one adapter), selecting the active adapter."""
    remove_selector(state)
    if len(state.named) < 2:
        return
    with keras.name_scope(f"{adapted_model(model).name}_relora"):
        selector = AdapterSelector(len(state.named), name="selector")
    selector.mix.assign(_one_hot(state, state.active))
    for layer in _adapted_layers(state):
        with _keras_internals.unlocked_tracker(layer):
            setattr(layer, SELECTOR_ATTRIBUTE, selector)
    state.selector = selector


def remove_selector(state):
    """Removes the selector from every layer that holds it."""
    selector = state.selector
    if selector is None:
        return
    for layer in _adapted_layers(state):
        if SELECTOR_ATTRIBUTE in dir(layer):
            with _keras_internals.unlocked_tracker(layer) as tracker:
                tracker.untrack(selector)
                delattr(layer, SELECTOR_ATTRIBUTE)
    state.selector = None


def remove_layers(state, name):
    """Removes adapter `name`'s `ReloraDense`s from their layers."""
    attribute = f"relora{suffix(name)}"
    for adapter in state.named[name].adapters.values():
        layer = adapter._base_layer
        with _keras_internals.unlocked_tracker(layer) as tracker:
            tracker.untrack(adapter)
            if attribute in dir(layer):
                delattr(layer, attribute)
        registry = layer.__dict__.get(REGISTRY)
        if registry is not None:
            registry.pop(name, None)


_COMPILED = (
    "predict_function",
    "train_function",
    "test_function",
    "generate_function",  # keras-hub's CausalLM
)


def _reset_compiled(model):
    """Drops the compiled predict/train/test functions (traced again)."""
    for holder in {id(m): m for m in [model, *holders(model)]}.values():
        for name in _COMPILED:
            if getattr(holder, name, None) is not None:
                setattr(holder, name, None)


def _refresh(model):
    refresh_torch_parameters(model)
    _reset_compiled(model)


def added(model, state, name):
    """Called by `enable_relora` after adapter `name` joined `state`."""
    _set_selector(model, state)
    _refresh(model)


def _require_name(state, name, what):
    if not isinstance(name, str) or name not in state.named:
        raise ValueError(
            f"{what}: the model has no adapter named {name!r}. Its "
            f"adapters: {list(state.named)}. Received: adapter_name={name!r}"
        )
    return name


def resolve_name(state, name, what):
    """`name` checked against `state.named`; None is the active adapter."""
    if name is None:
        return state.active
    return _require_name(state, name, what)


@contextlib.contextmanager
def activated(state, name):
    """`state` records adapter `name` as the active one inside the block
    (Python state only: `settings`, `adapters`, ..., which saving reads;
    the outputs do not change). None: the active adapter."""
    previous = state.active
    if name is None or name == previous:
        yield state
        return
    state.activate(name)
    try:
        yield state
    finally:
        state.activate(previous)


@contextlib.contextmanager
def selected(model, name):
    """`model` computes with adapter `name` alone inside the block (its
    selector too); the previous selection is restored on exit."""
    state = require_state(model, "`selected`")
    previous = state.active
    saved = None
    if state.selector is not None:
        saved = ops.convert_to_numpy(state.selector.mix).copy()
    set_adapter(model, name)
    try:
        yield state
    finally:
        state.activate(previous)
        if saved is not None:
            state.selector.mix.assign(saved)


def adapter_names(model):
    """The names of `model`'s adapters, in the order they were added.

    Args:
        model: A `keras.Model` with ReLoRA adapters.

    Returns:
        A list of str.

    Example:

    ```python
    model.enable_relora(rank=8)                       # "default"
    model.enable_relora(rank=4, adapter_name="sst2")
    keras_relora.adapter_names(model)  # ["default", "sst2"]
    ```
    """
    return list(require_state(model, "`adapter_names`").named)


def active_adapter(model):
    """The name of `model`'s active adapter (a str)."""
    return require_state(model, "`active_adapter`").active


def set_adapter(model, adapter_name):
    """Makes adapter `adapter_name` the active one.

    The model's outputs become those of the base plus this adapter alone
    (bitwise); `fit` trains it alone (the other adapters' variables and
    optimizer slots stay bitwise as they are); saving, merging and the
    Reducer work on it. Switching writes a variable: compiled predict and
    train functions are not traced again (JAX, TensorFlow), and on torch
    nothing is allocated.

    Args:
        model: A `keras.Model` with ReLoRA adapters.
        adapter_name: str. One of `adapter_names(model)`.

    Returns:
        `model`.

    Example:

    ```python
    keras_relora.set_adapter(model, "sst2")
    model.predict(x)
    ```
    """
    state = require_state(model, "`set_adapter`")
    _require_name(state, adapter_name, "`set_adapter`")
    if state.selector is not None:
        state.selector.mix.assign(_one_hot(state, adapter_name))
    state.activate(adapter_name)
    return model


def delete_adapter(model, adapter_name):
    """Removes adapter `adapter_name` (its layers and variables).

    The active adapter cannot be deleted while there are others (call
    `set_adapter` first), nor the last one (use `keras_relora.unload`).
    The model's variables change: compile it again before `fit`.

    Args:
        model: A `keras.Model` with ReLoRA adapters.
        adapter_name: str. One of `adapter_names(model)`.

    Returns:
        `model`.
    """
    state = require_state(model, "`delete_adapter`")
    _require_name(state, adapter_name, "`delete_adapter`")
    if len(state.named) == 1:
        raise ValueError(
            f"Adapter {adapter_name!r} is the model's only adapter: to "
            "remove it, call `keras_relora.unload(model)`. "
            f"Received: adapter_name={adapter_name!r}"
        )
    if adapter_name == state.active:
        raise ValueError(
            f"Adapter {adapter_name!r} is active: call "
            "`keras_relora.set_adapter(model, other)` first (the model's "
            f"adapters: {list(state.named)}). "
            f"Received: adapter_name={adapter_name!r}"
        )
    remove_selector(state)  # From every layer, the deleted one's too.
    remove_layers(state, adapter_name)
    del state.named[adapter_name]
    _set_selector(model, state)
    _refresh(model)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """A context manager in which `model` gives its base model's outputs.

    Every adapter's output is weighted by 0 inside the block (on a model
    with one adapter, a flag: compiled functions trace again on entry and
    exit); the active adapter is restored on exit.

    Args:
        model: A `keras.Model` with ReLoRA adapters.

    Example:

    ```python
    with keras_relora.disable_adapters(model):
        base_logits = model.predict(x)
    ```
    """
    state = require_state(model, "`disable_adapters`")
    if state.selector is not None:
        saved = ops.convert_to_numpy(state.selector.mix).copy()
        state.selector.mix.assign(np.zeros_like(saved))
        try:
            yield model
        finally:
            state.selector.mix.assign(saved)
        return
    state.disabled = True
    _reset_compiled(model)
    try:
        yield model
    finally:
        state.disabled = False
        _reset_compiled(model)


@contextlib.contextmanager
def route_examples(model, adapter_ids):
    """A context manager routing each example to its own adapter.

    Inside the block, example `i` of every batch the model runs gets the
    base's output plus adapter `adapter_ids[i]`'s alone, in the same
    forward pass (PEFT's `adapter_names=`; several tasks served in one
    batch). The routing is Python state of the model, read when the
    model's functions are traced: compiled functions (predict, keras-hub's
    `generate`) are dropped on entry and exit and trace again, and every
    batch inside must have `len(adapter_ids)` examples, e.g. one `predict`
    with `batch_size=len(adapter_ids)`. A context manager, not an input,
    so that it works on any model (a keras-hub task's inputs and
    preprocessor are fixed). Every adapter computes its output on the
    whole batch.

    Args:
        model: A `keras.Model` with ReLoRA adapters.
        adapter_ids: A list with one entry per example: an adapter name, an
            int index into `adapter_names(model)`, or None (the base model
            alone).

    Example:

    ```python
    with keras_relora.route_examples(model, ["sst2", "arc", None]):
        logits = model.predict(x, batch_size=3)
    ```
    """
    state = require_state(model, "`route_examples`")
    weights = _example_weights(state, adapter_ids)
    state.example_weights = ops.convert_to_tensor(weights)
    _reset_compiled(model)
    try:
        yield model
    finally:
        state.example_weights = None
        _reset_compiled(model)


def _example_weights(state, adapter_ids):
    names = list(state.named)
    if isinstance(adapter_ids, (str, bytes)) or not hasattr(
        adapter_ids, "__len__"
    ):
        raise TypeError(
            "`adapter_ids` must be a list with one entry per example (an "
            "adapter name, an index into `adapter_names(model)`, or None). "
            f"Received: adapter_ids={adapter_ids!r}"
        )
    ids = np.asarray(adapter_ids, dtype=object).reshape(-1)
    weights = np.zeros((len(ids), len(names)), dtype="float32")
    for row, entry in enumerate(ids):
        if entry is None:
            continue
        if isinstance(entry, (int, np.integer)) and 0 <= entry < len(names):
            weights[row, int(entry)] = 1.0
        elif isinstance(entry, str) and entry in names:
            weights[row, names.index(entry)] = 1.0
        else:
            raise ValueError(
                f"`adapter_ids[{row}]` must be one of the model's adapter "
                f"names {names}, an index below {len(names)}, or None (the "
                f"base). Received: adapter_ids={list(adapter_ids)!r}"
            )
    return weights


# -- training one adapter among several ------------------------------------


def before_fit(model, state):
    """At `fit` start: freezes the inactive adapters in the optimizer."""
    if state.selector is None or getattr(model, "optimizer", None) is None:
        return
    AdapterMask.install(model, state).sync(state)


def _core_optimizer(optimizer):
    return getattr(optimizer, "inner_optimizer", None) or optimizer


def _slots(optimizer, variable):
    prefix = variable.path.replace("/", "_") + "_"
    return [
        v
        for v in optimizer.variables
        if v.name.startswith(prefix)
        and tuple(v.shape) == tuple(variable.shape)
        and not v.name.endswith(_NOT_RESTORED)
    ]


class AdapterMask:
    """Keeps the inactive adapters' variables and slots bitwise unchanged.

    Wraps `apply` of one optimizer instance (as `reducer.masked_update`
    does for blocks): snapshot, apply, put back where `keep[n]` is 0.

    Attributes:
        keep: Optimizer variable, float32 `(adapters,)`: 1 for the adapter
            that trains, 0 for the others.
        groups: list of `(index, [variable, slot, ...])`.
    """

    def __init__(self, state, optimizer, groups):
        self.names = list(state.named)
        self.groups = groups
        self.keep = optimizer.add_variable(
            shape=(len(self.names),),
            initializer="zeros",
            dtype="float32",
            name="relora_adapter_keep",
        )
        self._original_apply = optimizer.apply
        state.patch(optimizer, "apply", self._apply)
        _exclude_mirrors_from_saving(state, optimizer)

    @classmethod
    def install(cls, model, state):
        optimizer = _core_optimizer(model.optimizer)
        trainable = {id(v) for v in model.trainable_variables}
        existing = optimizer.__dict__.get(_MASK_ATTRIBUTE)
        if existing is not None:
            if existing.names == list(state.named):
                return existing
            raise ValueError(
                "This optimizer was set up for other adapters "
                f"({existing.names}); the model now has "
                f"{list(state.named)}. Compile the model again with a new "
                "optimizer instance before `fit`."
            )
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        groups = []
        for index, group in enumerate(state.named.values()):
            variables = [
                v for v in group.variables().values() if id(v) in trainable
            ]
            slots = [s for v in variables for s in _slots(optimizer, v)]
            groups.append((index, variables + slots))
        mask = cls(state, optimizer, groups)
        state.patch(optimizer, _MASK_ATTRIBUTE, mask)
        return mask

    def sync(self, state):
        mix = ops.convert_to_numpy(state.selector.mix)
        self.keep.assign((mix != 0).astype("float32"))
        return self

    def _apply(self, grads, trainable_variables=None):
        keep = ops.convert_to_tensor(self.keep)
        # `copy`: torch updates variables in place.
        old = [
            [ops.copy(ops.convert_to_tensor(v)) for v in variables]
            for _, variables in self.groups
        ]
        result = self._original_apply(grads, trainable_variables)
        for (index, variables), values in zip(self.groups, old, strict=True):
            kept = ops.greater(keep[index], 0)
            for variable, value in zip(variables, values, strict=True):
                variable.assign(
                    ops.where(kept, ops.convert_to_tensor(variable), value)
                )
        return result


def _exclude_mirrors_from_saving(state, optimizer):
    """Leaves the `relora_*` mirror variables out of the optimizer's saved
    state, so that checkpoints load into a fresh optimizer (see
    `reducer.masked_update`, which shares the patch)."""
    if _SAVING_ATTRIBUTE in optimizer.__dict__:
        return
    original = optimizer.load_own_variables

    def saved():
        return [
            v
            for v in optimizer.variables
            if not v.name.startswith(_MIRROR_PREFIX)
        ]

    def save_own_variables(store):
        for i, variable in enumerate(saved()):
            store[str(i)] = variable.numpy()

    def load_own_variables(store):
        variables = saved()
        if len(store.keys()) != len(variables):
            return original(store)
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    state.patch(optimizer, _SAVING_ATTRIBUTE, True)
    state.patch(optimizer, "save_own_variables", save_own_variables)
    state.patch(optimizer, "load_own_variables", load_own_variables)
