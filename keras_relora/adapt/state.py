"""The record of what `enable_relora` changed on a model.

`enable_relora` puts a `ReloraState` on the model; saving, merging and the
Reducer read it through `get_state`/`require_state`, and `unload` undoes
it. Every change to an object that enabling (or the Reducer, or saving)
makes on an instance goes through `ReloraState.patch`, so that `unload`
undoes them all in one loop. This module imports no other module of the
package (but `_keras_internals`), so every part of it can depend on this
one.
"""

import contextlib
import dataclasses

import keras
import numpy as np

from keras_relora import _keras_internals

# The attribute of the adapted model that holds the Reducer's variables
# (`save_weights` walks attributes, so it finds them there).
REDUCER_ATTRIBUTE = "relora_reducer"
_STATE_ATTRIBUTE = "_relora_state"
_MISSING = object()


@dataclasses.dataclass(eq=False)
class Patch:
    """One attribute of one object replaced on the instance.

    Attributes:
        obj: The object changed (a layer, the model, an optimizer).
        name: The attribute, `"__class__"` for a class swap.
        previous: The instance's own value before, or `_MISSING` if the
            attribute came from the class (the class for a swap).
    """

    obj: object
    name: str
    previous: object

    @classmethod
    def apply(cls, obj, name, value):
        if name == "__class__":
            patch = cls(obj, name, type(obj))
            _keras_internals.swap_class(obj, value)
        else:
            patch = cls(obj, name, obj.__dict__.get(name, _MISSING))
            _keras_internals.set_untracked(obj, name, value)
        return patch

    def undo(self):
        if self.name == "__class__":
            _keras_internals.swap_class(self.obj, self.previous)
        elif self.previous is _MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            _keras_internals.set_untracked(self.obj, self.name, self.previous)


@contextlib.contextmanager
def patched(obj, name, value):
    """`ReloraState.patch` for the duration of a `with` block."""
    patch = Patch.apply(obj, name, value)
    try:
        yield
    finally:
        patch.undo()


class ReducerVariables(keras.layers.Layer):
    """The Reducer's model-side state: block scores and the sampling seed.

    Kept on the adapted model (untracked by its layer list, so the model's
    variables and train step do not change) under the attribute
    `relora_reducer`, where `save_weights` finds it; the scores and seed
    are registered in the model's `ReloraState.extra_variables`, which
    adapter checkpoints carry. Made by `ReloraState.add_reducer`.

    It also carries the optimizer's per-block update counts of B
    (`update_counts`, with `counts_at`, the optimizer step they were
    taken at) into `save_weights` and `.keras` files: they are optimizer
    state, but saved with the optimizer they would make its variables
    differ in number from a plain optimizer's, whose checkpoints then no
    longer load into each other. They are copied from the optimizer when
    saved (`counts_source`), and the Reducer adopts them at the next
    `fit` start only if the optimizer's step is still `counts_at` (the
    optimizer state was loaded with them). Files written before these
    variables existed hold two entries and load as before.
    """

    def __init__(self, num_blocks, **kwargs):
        super().__init__(**kwargs)
        self.num_blocks = num_blocks
        self.scores = self.add_weight(
            name="scores",
            shape=(num_blocks,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )
        self.seed = self.add_weight(
            name="seed",
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
        )
        self.update_counts = self.add_weight(
            name="update_counts",
            shape=(num_blocks,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
        )
        self.counts_at = self.add_weight(
            name="counts_at",
            shape=(),
            initializer=keras.initializers.Constant(-1),
            dtype="int32",
            trainable=False,
        )
        self.built = True
        # `() -> (counts, step)` or None; set by the Reducer's optimizer.
        _keras_internals.set_untracked(self, "counts_source", None)
        # Whether the counts were loaded since the Reducer last read them.
        _keras_internals.set_untracked(self, "counts_loaded", False)

    def save_own_variables(self, store):
        source = self.counts_source() if self.counts_source else None
        if source is not None:
            counts, step = source
            self.update_counts.assign(np.asarray(counts, dtype="int32"))
            self.counts_at.assign(np.int32(step))
        super().save_own_variables(store)

    def load_own_variables(self, store):
        if len(store.keys()) == 2:  # Files from before the counts.
            self.scores.assign(store["0"])
            self.seed.assign(store["1"])
            self.counts_at.assign(np.int32(-1))
        else:
            super().load_own_variables(store)
        _keras_internals.set_untracked(self, "counts_loaded", True)


@dataclasses.dataclass(eq=False)
class AdapterGroup:
    """One named adapter: its settings and layers (see `ReloraState`)."""

    settings: dict
    adapters: dict
    shared_a: dict
    blocks: list

    def variables(self):
        """The adapter's variables, keyed by path (A once, in order)."""
        found = {}
        for adapter in self.adapters.values():
            for variable in adapter.shared_a.weights + adapter.weights:
                found.setdefault(variable.path, variable)
        return found


@dataclasses.dataclass(eq=False)
class ReloraState:
    """What `enable_relora` did to a model (kept on the model, untracked).

    Attributes:
        settings: dict. The `enable_relora` arguments, with `targets`
            resolved to the list of adapted layer paths.
        adapters: dict. Layer path -> `ReloraDense`, in path order.
        shared_a: dict. Group key -> `SharedLoraA`.
        blocks: list of str. Block keys; an adapter's `block` indexes it.
        frozen: list. Variables that were trainable before and were frozen.
        trained: dict. Relative path -> variable of the `train_layers`,
            which train in full next to the adapters.
        reducer: `ReducerVariables` or None. The Reducer's scores and seed,
            once a `ReducerCallback` (or a loaded file) attached them.
        fit_data: dict or None. The `x`, `y`, `sample_weight` and
            `batch_size` of the latest `model.fit` call, so that callbacks
    fit_data: dict or None. The `x`, `y`, `sample_weight`,
            `batch_size` and `validation_split` (0 when `validation_data`
            overrides it) of the latest `model.fit` call, so that callbacks
            (the Reducer's probe) can hold a batch of the training data.
        extra_variables: dict. Path -> variable of further ReLoRA state
            that checkpoints must carry (the Reducer's scores and seed).
        patches: list of `Patch`, in the order they were applied.
        named: dict. Adapter name -> `AdapterGroup`, in the order added.
            `settings`, `adapters`, `shared_a` and `blocks` above are the
            active adapter's (`activate` points them there), so saving,
            merging and the Reducer work on the active adapter.
        active: str. The name of the active adapter.
        selector: The `AdapterSelector` that weights every adapter's
            output in the forward pass (None while there is one adapter).
        example_weights: None, or a `(batch, len(named))` tensor that
            routes each example to its adapters (`route_examples`).
        disabled: bool. True inside `disable_adapters` on a model with
            one adapter (with several, the selector holds zeros instead).
    """

    settings: dict
    adapters: dict
    shared_a: dict
    blocks: list
    frozen: list
    trained: dict = dataclasses.field(default_factory=dict)
    reducer: ReducerVariables | None = None
    fit_data: dict | None = None
    extra_variables: dict = dataclasses.field(default_factory=dict)
    patches: list = dataclasses.field(default_factory=list)
    named: dict = dataclasses.field(default_factory=dict)
    active: str = "default"
    selector: object = None
    example_weights: object = None
    disabled: bool = False

    def activate(self, name):
        """Points `settings`, `adapters`, `shared_a`, `blocks` at the
        adapter `name` (Python state only; see `named_adapters`)."""
        group = self.named[name]
        self.settings = group.settings
        self.adapters = group.adapters
        self.shared_a = group.shared_a
        self.blocks = group.blocks
        self.active = name

    def patch(self, obj, name, value):
        """Sets `obj.name = value` on the instance, untracked by Keras, and
        records it for `undo_patches`. `name="__class__"` swaps the class.
        """
        self.patches.append(Patch.apply(obj, name, value))

    def undo_patches(self):
        """Undoes every `patch`, the latest first."""
        while self.patches:
            self.patches.pop().undo()

    def add_reducer(self, model, seed):
        """Attaches the Reducer's variables (scores at zero) to `model`."""
        root = adapted_model(model)
        reducer = ReducerVariables(self.num_blocks, name=REDUCER_ATTRIBUTE)
        reducer.seed.assign(np.int32(seed))
        # A plain attribute: `save_weights` walks attributes, while the
        # model's variable lists (and so its compiled step) stay as they are.
        self.patch(root, REDUCER_ATTRIBUTE, reducer)
        self.reducer = reducer
        for variable in (reducer.scores, reducer.seed):
            self.extra_variables[variable.path] = variable
        return reducer

    def variables(self):
        """Every ReLoRA variable, keyed by its path (A once, in order)."""
        found = {}
        for adapter in self.adapters.values():
            for variable in adapter.shared_a.weights + adapter.weights:
                found.setdefault(variable.path, variable)
        found.update(self.extra_variables)
        return found

    @property
    def num_blocks(self):
        return len(self.blocks)


def adapted_model(model):
    """The model that holds the layers: a keras-hub Task's backbone."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model):
        return backbone
    return model


def holders(model):
    """`model` and the model that holds its layers, each once."""
    return list({id(m): m for m in (model, adapted_model(model))}.values())


def get_state(model):
    """The model's `ReloraState`, or None if ReLoRA is not enabled."""
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None and adapted_model(model) is not model:
        state = adapted_model(model).__dict__.get(_STATE_ATTRIBUTE)
    return state


def require_state(model, what):
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"{what} needs a model with ReLoRA adapters: call "
            "`model.enable_relora(...)` first."
        )
    return state


def set_state(model, state):
    """Puts `state` on `model` (and its backbone), recorded as patches."""
    # A plain attribute, outside Keras's tracking and torch's Module registry.
    for holder in holders(model):
        state.patch(holder, _STATE_ATTRIBUTE, state)
