"""`ReloraState`: the one record of what enabling changed, and `unload`
undoing all of it (layers, model, optimizer, class, Reducer)."""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora
from keras_relora.adapt.state import Patch
from keras_relora.adapt.state import patched


def _own_attributes(model):
    """`{id: (object, its __dict__ keys, class)}` of the model and layers."""
    objects = [model, *model._flatten_layers(include_self=False)]
    return {id(o): (o, set(vars(o)), type(o)) for o in objects}


def test_unload_undoes_every_patch_of_enable_fit_and_reducer():
    model = tm.block_mlp()
    x, y = tm.dense_data(batch=16)
    base_out = ops.convert_to_numpy(model(x))
    base_class = type(model)
    before = _own_attributes(model)

    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    state = keras_relora.get_state(model)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=2)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[reducer], verbose=0)
    tm.randomize_adapters(model)
    # Each kind of change is in the record: the layers' calls, the model's
    # `fit`, class and state, the Reducer's variables, the optimizer's
    # update step and weight decay (the per-block update of B) and saving
    # methods.
    names = {p.name for p in state.patches}
    assert {"call", "quantized_call", "fit", "__class__"} <= names
    assert {"_relora_state", "relora_reducer"} <= names
    assert {"_backend_update_step", "_apply_weight_decay"} <= names
    assert {"save_own_variables", "load_own_variables"} <= names
    assert state.reducer is model.relora_reducer
    assert type(model) is not base_class
    optimizer = model.optimizer
    optimizer_keys = set(vars(optimizer))

    keras_relora.unload(model)
    assert state.patches == []
    assert keras_relora.get_state(model) is None
    assert type(model) is base_class
    assert not hasattr(model, "relora_reducer")
    # The optimizer has its own methods back.
    patched_keys = {
        "_backend_update_step",
        "_apply_weight_decay",
        "save_own_variables",
        "load_own_variables",
    }
    assert patched_keys <= optimizer_keys
    assert not patched_keys & set(vars(optimizer))
    assert not any(k.startswith("_relora") for k in vars(optimizer))
    after = _own_attributes(model)
    assert set(after) == set(before)
    for key, (obj, keys, cls) in before.items():
        # Only the post-`unload` guard against a stale compile may remain
        # (and what Keras's own `compile` and `fit` add to the model).
        added = {k for k in after[key][1] - keys if "relora" in k}
        added |= {"call", "quantized_call"} & (after[key][1] - keys)
        assert not added, (obj, added)
        assert after[key][2] is cls, obj
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), base_out)
    assert all(v.trainable for v in model.weights)


def test_patch_restores_an_own_attribute_a_class_attribute_and_a_class():
    class Thing:
        size = 1

    class Other(Thing):
        pass

    thing = Thing()
    thing.colour = "red"
    patches = [
        Patch.apply(thing, "colour", "blue"),
        Patch.apply(thing, "size", 2),
        Patch.apply(thing, "__class__", Other),
    ]
    assert (thing.colour, thing.size, type(thing)) == ("blue", 2, Other)
    for patch in reversed(patches):
        patch.undo()
    assert (thing.colour, thing.size, type(thing)) == ("red", 1, Thing)
    assert "size" not in vars(thing)

    with pytest.raises(RuntimeError, match="inside"):
        with patched(thing, "size", 3):
            assert thing.size == 3
            raise RuntimeError("inside")
    assert thing.size == 1 and "size" not in vars(thing)


def test_adapters_get_their_role_from_the_constructor():
    model = tm.block_mlp(num_blocks=2)
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    adapters = keras_relora.get_state(model).adapters.values()
    assert [a.role for a in adapters] == ["layer", "layer"]
    config = next(iter(adapters)).get_config()
    assert config["role"] == "layer"
    # A config saved before `role` existed still loads, without a role.
    del config["role"]
    clone = keras_relora.ReloraDense.from_config(config)
    assert clone.role is None
    with pytest.raises(TypeError, match=r"`role` must be None or a str"):
        keras_relora.ReloraDense(
            keras.layers.Dense(2), keras_relora.SharedLoraA(3, 1), role=1
        )


def test_prune_reads_the_importance_from_the_state():
    model = tm.adapted_block_mlp()
    state = keras_relora.get_state(model)
    with pytest.raises(ValueError, match="needs block importance"):
        keras_relora.prune(model, 0.5)
    state.add_reducer(model, seed=0)
    state.reducer.scores.assign([3.0, -1.0, 2.0, -2.0])  # importance -s.
    assert keras_relora.prune(model, 0.5) == [0, 2]
