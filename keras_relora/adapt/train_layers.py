"""`train_layers`: the layers that train in full next to the adapters.

A keras-hub Task adds its own layers to the backbone (a classifier's
`logits` Dense): they are new and random, so frozen they never learn and
the adapters train against a random head. keras-hub's `enable_lora`
leaves a Task's layers outside the backbone trainable, and PEFT trains
and saves whole modules named in `modules_to_save`. `enable_relora` does
the same with `train_layers`: `None` (the default) keeps a Task's
variables outside its backbone trainable (nothing for a model that is not
a Task), a list names the layers to keep trainable, `[]` freezes all.

Only variables that were trainable stay trainable; `unload` leaves them
as they are, so the trainable flags are then as before `enable_relora`.
"""

from keras_relora import _keras_internals
from keras_relora.adapt import targets as targets_lib
from keras_relora.adapt.state import adapted_model


def check_train_layers(train_layers):
    """`train_layers` as None or a list of str; raises otherwise."""
    if train_layers is None:
        return None
    if isinstance(train_layers, (list, tuple)) and all(
        isinstance(name, str) for name in train_layers
    ):
        return list(train_layers)
    raise TypeError(
        "`train_layers` must be None (a keras-hub Task's own layers, "
        "outside its backbone), a list of layer names or paths to train "
        "in full, or `[]` (none), e.g. `train_layers=['logits']`. "
        f"Received: train_layers={train_layers!r}"
    )


def trained_variables(model, train_layers, adapted_layers):
    """`{relative path: variable}` of the variables that stay trainable.

    Args:
        model: The model given to `enable_relora`, not yet frozen.
        train_layers: None or a list of layer names or paths (checked by
            `check_train_layers`).
        adapted_layers: The layers that get adapters; none of their
            variables may train in full as well.
    """
    root = adapted_model(model)
    if train_layers is None:
        if root is model:
            return {}
        inside = {id(v) for v in root.weights}
        chosen = [v for v in model.trainable_weights if id(v) not in inside]
    else:
        layers = {}
        for layer in _keras_internals.flatten_layers(model):
            path = layer.path or layer.name
            for key in (
                layer.name,
                path,
                targets_lib.relative_path(root, path),
            ):
                layers.setdefault(key, layer)
        missing = [name for name in train_layers if name not in layers]
        if missing:
            named = sorted(
                {layer.name for layer in layers.values() if layer.weights}
            )
            raise ValueError(
                f"`train_layers` names layers that model {model.name!r} "
                f"does not have: {missing}. Layers with weights: {named}. "
                f"Received: train_layers={train_layers!r}"
            )
        chosen = {}
        for name in train_layers:
            for variable in layers[name].trainable_weights:
                chosen.setdefault(id(variable), variable)
        chosen = list(chosen.values())
    adapted = {id(v) for layer in adapted_layers for v in layer.weights}
    both = [v.path for v in chosen if id(v) in adapted]
    if both:
        raise ValueError(
            f"`train_layers` would train adapted layers in full ({both}): "
            "a layer gets an adapter or trains in full, not both. Leave it "
            "out of `targets` or of `train_layers`. "
            f"Received: train_layers={train_layers!r}"
        )
    return {targets_lib.relative_path(root, v.path): v for v in chosen}
