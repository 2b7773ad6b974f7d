"""`keras_relora.prune`: static removal of the B experts of whole blocks."""

import keras
import numpy as np
import pytest
import tiny_models as tm
from keras import ops

import keras_relora

NUM_BLOCKS = 4


def randomize_b(state, seed=0):
    """Gives every B a random value, so that adapters change outputs."""
    rng = np.random.default_rng(seed)
    for adapter in state.adapters.values():
        if adapter.b_kernel is not None:
            shape = tuple(adapter.b_kernel.shape)
            adapter.b_kernel.assign(rng.normal(size=shape).astype("float32"))


def base_output(layer, x):
    """The frozen layer's own output, computed from its weights."""
    equation = getattr(layer, "equation", "...a,ab->...b")
    y = ops.einsum(equation, x, layer.kernel)
    if layer.bias is not None:
        y = y + layer.bias
    return layer.activation(y) if layer.activation is not None else y


def test_prune_half_of_llama_blocks(tmp_path):
    keras.utils.set_random_seed(0)
    lm = tm.llama3_causal_lm(num_layers=4)
    lm.enable_relora(rank=2, experts=2)
    state = keras_relora.get_state(lm)
    assert state.num_blocks == NUM_BLOCKS
    randomize_b(state)
    full_file = tmp_path / "full.weights.h5"
    lm.save_weights(str(full_file))
    trainable_before = lm.trainable_variables
    saved_before = set(state.variables())

    importance = np.array([0.3, -1.0, 2.0, -0.5])
    pruned = keras_relora.prune(lm, 0.5, importance=importance)
    assert pruned == [1, 3]  # The two least important blocks.

    gone = [
        v
        for adapter in state.adapters.values()
        if adapter.block in pruned
        for v in (adapter.b_kernel, adapter.router_kernel)
    ]
    assert gone == [None] * len(gone)
    trainable = {id(v) for v in lm.trainable_variables}
    removed = [v for v in trainable_before if id(v) not in trainable]
    per_block = 5 * 2  # (q, k, v, up, down) x (B, router)
    assert len(removed) == len(pruned) * per_block
    assert all(
        v.path.startswith(tuple(f"transformer_layer_{b}/" for b in pruned))
        for v in removed
    )
    # The adapter checkpoint (`state.variables()`) and `save_weights` shrink.
    saved_after = set(state.variables())
    assert {v.path for v in removed} == saved_before - saved_after
    pruned_file = tmp_path / "pruned.weights.h5"
    lm.save_weights(str(pruned_file))
    assert pruned_file.stat().st_size < full_file.stat().st_size
    if hasattr(keras_relora, "save_relora_weights"):
        adapters_full = tmp_path / "full.safetensors"
        adapters_pruned = tmp_path / "pruned.safetensors"
        lm2 = tm.llama3_causal_lm(num_layers=4)
        lm2.enable_relora(rank=2, experts=2)
        keras_relora.save_relora_weights(lm2, str(adapters_full))
        keras_relora.save_relora_weights(lm, str(adapters_pruned))
        assert adapters_pruned.stat().st_size < adapters_full.stat().st_size

    # Pruned layers give their base output; the others do not.
    rng = np.random.default_rng(1)
    for path, adapter in state.adapters.items():
        layer = adapter._base_layer
        x = rng.normal(size=(2, 3) + adapter.axes.in_shape).astype("float32")
        got = ops.convert_to_numpy(layer(x))
        want = ops.convert_to_numpy(base_output(layer, x))
        if adapter.block in pruned:
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=path)
        else:
            assert np.abs(got - want).max() > 1e-3, path


def test_prune_defaults_to_the_learned_importance():
    model = tm.adapted_block_mlp()
    x, y = tm.dense_data(32)
    reducer = keras_relora.ReducerCallback(update_layers=2, interval=1, seed=3)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[reducer])
    importance = reducer.importance
    assert len(set(importance.tolist())) == NUM_BLOCKS
    expected = sorted(np.argsort(importance)[:2].tolist())
    assert keras_relora.prune(model, 0.5) == expected

    # Training goes on after compiling again; pruned blocks never update.
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    state = keras_relora.get_state(model)
    kernels = {
        a.block: a.b_kernel
        for a in state.adapters.values()
        if a.b_kernel is not None
    }
    assert sorted(kernels) == sorted(set(range(NUM_BLOCKS)) - set(expected))
    before = {b: ops.convert_to_numpy(v).copy() for b, v in kernels.items()}
    with pytest.warns(UserWarning, match="every block updates"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[keras_relora.ReducerCallback(update_layers=3, seed=3)],
        )
    for block, kernel in kernels.items():
        assert not np.array_equal(before[block], ops.convert_to_numpy(kernel))
    reducer = keras_relora.ReducerCallback(update_layers=1, interval=2, seed=3)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[reducer])
    # The probes never suppress pruned blocks.
    assert reducer._active.tolist() == [
        b not in expected for b in range(NUM_BLOCKS)
    ]


def test_prune_random_is_seeded_and_counts_earlier_pruning():
    model = tm.adapted_block_mlp()
    first = keras_relora.prune(model, 0.25, strategy="random", seed=4)
    assert len(first) == 1
    other = tm.adapted_block_mlp()
    assert keras_relora.prune(other, 0.25, strategy="random", seed=4) == first
    # 50% of the 4 blocks: one more block, not two.
    second = keras_relora.prune(model, 0.5, strategy="random", seed=1)
    assert len(second) == 1 and second[0] not in first
    assert keras_relora.prune(model, 0.5, strategy="random") == []


def test_prune_argument_errors():
    model = tm.adapted_block_mlp()
    with pytest.raises(ValueError, match="Received: drop_ratio=1.5"):
        keras_relora.prune(model, 1.5)
    with pytest.raises(ValueError, match="Received: strategy='lowest'"):
        keras_relora.prune(model, 0.5, strategy="lowest")
    with pytest.raises(ValueError, match="shape \\(4,\\). Received"):
        keras_relora.prune(model, 0.5, importance=[1.0, 2.0])
    with pytest.raises(ValueError, match="ReducerCallback"):
        keras_relora.prune(model, 0.5)  # No importance learned yet.
    with pytest.raises(ValueError, match="enable_relora"):
        keras_relora.prune(tm.block_mlp(), 0.5)
