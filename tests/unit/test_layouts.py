"""How `enable_relora(layout_map=...)` lays out B: the rule, on every backend.

The sharded training itself (JAX, 8 devices) is `test_distribution.py`.
"""

import types

import keras
import pytest

from keras_relora.adapt import layouts


class FakeLayoutMap:
    """Answers `layout_map[path]` as a `keras.distribution.LayoutMap` does."""

    def __init__(self, entries):
        self.entries = entries

    def __getitem__(self, path):
        axes = self.entries.get(path)
        return None if axes is None else types.SimpleNamespace(axes=axes)


def einsum(equation, output_shape, input_shape, name):
    layer = keras.layers.EinsumDense(equation, output_shape, name=name)
    layer.build(input_shape)
    return layer


@pytest.mark.parametrize(
    "equation,output_shape,input_shape,kernel_axes,expected",
    [
        # Llama query: kernel (hidden, heads, head_dim); output (heads,
        # head_dim) flattened, split on the heads' mesh axis.
        (
            "bqm,muh->bquh",
            (None, 4, 2),
            (None, None, 6),
            ("model", "batch", None),
            (None, None, "batch"),
        ),
        # Only a later output axis sharded: the flattened d_out cannot be
        # split the same way, so B is replicated.
        (
            "bqm,muh->bquh",
            (None, 4, 2),
            (None, None, 6),
            ("model", None, "batch"),
            (None, None, None),
        ),
        # Attention output: kernel (heads, head_dim, hidden), output hidden.
        (
            "bquh,uhm->bqm",
            (None, 6),
            (None, None, 4, 2),
            ("model", None, "batch"),
            (None, None, "batch"),
        ),
        # Kernel axes in another order than the output's: "btd,ndh->btnh".
        (
            "btd,ndh->btnh",
            (None, 4, 2),
            (None, None, 6),
            ("model", None, None),
            (None, None, "model"),
        ),
        # Base kernel not in the map: replicated.
        (
            "bqm,muh->bquh",
            (None, 4, 2),
            (None, None, 6),
            None,
            (None, None, None),
        ),
    ],
)
def test_b_kernel_axes_follow_the_base_output_axis(
    equation, output_shape, input_shape, kernel_axes, expected
):
    layer = einsum(equation, output_shape, input_shape, "proj")
    layout_map = FakeLayoutMap(
        {} if kernel_axes is None else {layer.kernel.path: kernel_axes}
    )
    assert layouts.b_kernel_axes(layer, layout_map) == expected


def test_dense_b_kernel_axes():
    layer = keras.layers.Dense(8, name="up")
    layer.build((None, 6))
    layout_map = FakeLayoutMap({layer.kernel.path: ("batch", "model")})
    assert layouts.b_kernel_axes(layer, layout_map) == (None, None, "model")


def test_check_paths_names_what_was_not_created():
    variables = [types.SimpleNamespace(path="a/relora/b_kernel")]
    layouts.check_paths({"a/relora/b_kernel": ()}, variables)
    with pytest.raises(RuntimeError, match=r"\['a/relora/router_kernel'\]"):
        layouts.check_paths(
            {"a/relora/b_kernel": (), "a/relora/router_kernel": ()},
            variables,
        )
