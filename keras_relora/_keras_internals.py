"""Every use of Keras's private API in keras_relora, with why.

Keras 3 has no public hook for some of what adapters need: adding a
sub-layer to a built layer, listing new variables as torch parameters,
opting a throw-away variable out of deferred initialisation. Each such use
lives here, behind a function named for what it does, so a Keras upgrade
breaks one module and the test suite says which function. `pyproject.toml`
bounds keras and keras-hub to the releases CI has run against.

Besides the private attributes below, the package changes instances in
ways that rely on Keras's behaviour rather than its private names. Each
such change made while adapters are enabled is a patch recorded in the
model's `ReloraState` (`adapt.state`), which `unload` undoes in one loop:

* `set_untracked` replaces an instance's `call`/`quantized_call`
  (`adapt.enable_relora`: the adapter's output is added to a layer's own,
  also for layers that are nodes of a functional graph), its `fit`
  (`adapt.enable_relora`: the Reducer's probe reads the training data), an
  optimizer's `apply` (`adapt.named_adapters`) and
  `save/load_own_variables` (`reducer.masked_update`), its update step
  (`route_optimizer_update`, for `reducer.masked_update`: the per-block
  update of B), a Task backbone's `save_to_preset`/`export_to_transformers`
  (`adapt.model_class`), for the length of a `with` block a router's
  `gates` (`saving.merge`: calibration), and a merged backbone's
  `get_config` (`adapt.tied_embeddings`).
* `swap_class` changes a model's class to a per-class saving subclass and
  back (`adapt.model_class`).
* `optimizer_built_for` reads a built optimizer's `_trainable_variables`
  (`adapt.enable_relora`: `fit` refuses a stale compile).
* `refuse_graph_clones` overrides `Functional._run_through_graph` in the
  saving subclass (`adapt.model_class`: `clone_model` refuses to drop
  adapters).
"""

import contextlib

import keras


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


def untrack_variable(layer, variable):
    """Removes `variable` from `layer`'s variables (`ReloraDense.prune`).

    Keras has no public way to drop a variable from a built layer;
    `Layer._untrack_variable` is what its own `__delattr__` uses.
    """
    layer._untrack_variable(variable)


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


def optimizer_built_for(optimizer):
    """The variables a built optimizer updates; None if it is not built.

    `BaseOptimizer.build(variables)` keeps them in `_trainable_variables`
    (a `LossScaleOptimizer` in its `inner_optimizer`). `fit` with a model
    whose trainable set changed since breaks on JAX ("optimizer_variables
    ... 1:1", and the model's state is lost), raises on torch and trains
    the old set on TensorFlow; `adapt.enable_relora` refuses it first.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if optimizer is None or not getattr(optimizer, "built", False):
        return None
    return list(getattr(optimizer, "_trainable_variables", None) or [])


def refuse_graph_clones(namespace, cls, refuse):
    """Makes a functional class's `clone_model` call `refuse(model, layer)`.

    `keras.models.clone_model` of a functional model (keras-hub backbones
    and tasks included) runs `Functional._run_through_graph` with an
    `operation_fn` that returns a clone of each layer, made from its
    config: injected adapters are in no config, so the clone silently
    loses them, and Keras has no public hook. This adds to `namespace`
    (of a subclass of `cls`) a `_run_through_graph` that calls
    `refuse(self, layer)` for each layer replaced by a new one, before the
    clone is assembled (a call of the model returns callables, not layers,
    and is not checked).
    """
    original = getattr(cls, "_run_through_graph", None)
    if original is None:
        return

    def _run_through_graph(self, inputs, operation_fn, call_fn=None):
        def checked(operation):
            result = operation_fn(operation)
            if result is not operation and isinstance(
                result, keras.layers.Layer
            ):
                refuse(self, operation)
            return result

        return original(self, inputs, checked, call_fn=call_fn)

    namespace["_run_through_graph"] = _run_through_graph


def route_optimizer_update(optimizer, update_step, weight_decay, setter=None):
    """Routes an optimizer's variable updates through two functions.

    `BaseOptimizer.apply` unscales the gradients (loss scaling), adds them
    up (gradient accumulation), clips them, then calls
    `_apply_weight_decay(variables)` and `_backend_update_step(grads,
    variables, learning_rate)`; each backend overrides these two (torch's
    fused `foreach` update, TensorFlow's distribution merge call, JAX's
    stateless accumulation calls them unconditionally). Keras has no
    public hook at that point, where the gradients are final. This
    replaces both on the instance: `update_step(original, grads,
    variables, learning_rate)` and `weight_decay(original, variables)`
    receive the instance's own methods as `original`
    (`reducer.masked_update`: the per-block update of B). `setter(obj,
    name, value)` sets the two attributes (default `set_untracked`; the
    Reducer passes `ReloraState.patch`, so `unload` undoes them).
    """
    original_update = optimizer._backend_update_step
    original_decay = optimizer._apply_weight_decay

    def _backend_update_step(grads, variables, learning_rate):
        return update_step(original_update, grads, variables, learning_rate)

    def _apply_weight_decay(variables):
        return weight_decay(original_decay, variables)

    setter = setter or set_untracked
    setter(optimizer, "_backend_update_step", _backend_update_step)
    setter(optimizer, "_apply_weight_decay", _apply_weight_decay)


def uses_weight_decay(optimizer, variable):
    """Whether `optimizer` decays `variable` (`exclude_from_weight_decay`).

    `BaseOptimizer._use_weight_decay` resolves the variables and name
    patterns excluded with the public `exclude_from_weight_decay`.
    """
    return optimizer.weight_decay is not None and optimizer._use_weight_decay(
        variable
    )


def rebuild_jax_train_state(model):
    """Makes a JAX `fit`'s saved state whole after a `predict_on_batch`.

    During a JAX `fit`, the trainer keeps the latest values of every
    variable in `model._jax_state` and puts them back at the end of the
    epoch. A `predict_on_batch` from a callback (the Reducer's probe)
    replaces that dict with the trainable and non-trainable variables
    only. If the data then ends with one more, empty step (a dataset of
    unknown length), `fit` takes the variables out of the model (purges
    them) for that step, finds no batch, and puts back only what the
    dict holds: the optimizer's and metrics' variables stay empty, and
    the epoch's metric read fails ("'NoneType' object is not callable").
    Called with the model's variables in sync, this stores all four
    groups again, from the variables; no-op on other backends.
    """
    if keras.config.backend() != "jax":
        return
    if getattr(model, "_jax_state", None) is None:
        return
    optimizer = getattr(model, "optimizer", None)
    model._jax_state = {
        "trainable_variables": [v.value for v in model.trainable_variables],
        "non_trainable_variables": [
            v.value for v in model.non_trainable_variables
        ],
        "optimizer_variables": (
            [v.value for v in optimizer.variables] if optimizer else []
        ),
        "metrics_variables": [v.value for v in model.metrics_variables],
    }
