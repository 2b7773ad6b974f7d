"""Every use of Keras's private API in keras_relora, with why.

Keras 3 has no public hook for some of what adapters need: adding a
sub-layer to a built layer, listing new variables as torch parameters,
opting a throw-away variable out of deferred initialisation. Each such use
lives here, behind a function named for what it does, so a Keras upgrade
breaks one module and the test suite says which function. `pyproject.toml`
bounds keras and keras-hub to the releases CI has run against.

Besides the private attributes below, the package changes instances in
ways that rely on Keras's behaviour rather than its private names:

* `set_untracked` replaces an instance's `call`/`quantized_call`
  (`adapt.enable_relora`: the adapter's output is added to a layer's own,
  also for layers that are nodes of a functional graph), its `fit`
  (`adapt.enable_relora`: the Reducer's probe reads the training data), an
  optimizer's `apply` (`reducer.masked_update`: the exact per-block
  freeze), a backbone's `save_to_preset`/`get_config`
  (`saving.model_saving`) and a router's `gates` (`saving.merge`:
  calibration).
* `swap_class` changes a model's class to a per-class saving subclass and
  back (`saving.model_saving`, `saving.merge`).
"""

import contextlib


def set_untracked(obj, name, value):
    """`obj.name = value` without Keras's attribute tracking.

    `Layer.__setattr__` tracks layers and variables, and on torch
    registers modules; state and patched methods must not be tracked.
    """
    object.__setattr__(obj, name, value)


def swap_class(obj, cls):
    """Changes the class of `obj` in place (same object, same state)."""
    obj.__class__ = cls


@contextlib.contextmanager
def unlocked_tracker(layer):
    """Lets a built layer take new sub-layers or drop them.

    A built layer's `_tracker` is locked ("cannot add new elements of
    state ... already built"); Keras's own `enable_lora` unlocks it the
    same way around the variables it adds.
    """
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield tracker
    finally:
        if locked:
            tracker.lock()


def untrack(layer, sublayer):
    """Removes `sublayer` from `layer`'s tracked sub-layers (`unload`)."""
    with unlocked_tracker(layer) as tracker:
        tracker.untrack(sublayer)


def list_torch_parameters(model):
    """On torch, re-lists `model`'s variables as its parameters.

    A torch-backend Keras layer registers its variables as torch
    parameters once, when built (`Layer._track_variables`); adapters added
    later are otherwise missing from `model.parameters()`.
    """
    if hasattr(model, "_track_variables"):
        model._track_variables()


def is_deferred(variable):
    """True if `variable` was created in a `StatelessScope` and has no
    value yet (`KerasVariable._value` is None until initialised)."""
    return variable._value is None


def skip_deferred_initialization(variable):
    """Opts a deferred variable out of Keras's global initialisation.

    Keras queues variables created with `initialize_variables=False` and
    allocates them all at the next model build; `budget`'s throw-away
    variables must never be allocated.
    """
    set_untracked(variable, "_deferred_initialize", _do_nothing)


def _do_nothing():
    return None


def flatten_layers(model):
    """Every sub-layer of `model`, depth first, without `model` itself.

    `Layer._flatten_layers` walks attribute-tracked layers too (keras-hub
    blocks keep sub-layers as attributes), which `model.layers` does not.
    """
    return model._flatten_layers(include_self=False)
