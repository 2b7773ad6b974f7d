"""Layouts of adapter variables under `keras.distribution.ModelParallel`.

`enable_relora(..., layout_map=layout_map)` adds an exact entry per adapter
variable to the `LayoutMap` that the active `ModelParallel` distribution
uses, before the variables are created (Keras reads a variable's layout
when it creates it):

* B, `(experts, rank, d_out)`: `d_out` sharded like the base kernel's first
  output axis, when that is the only sharded output axis (the flattened
  `d_out` then splits into the same contiguous blocks); otherwise
  replicated.
* A (shared by many layers), the router and the suppression factor:
  replicated.

Exact keys take precedence over the regex keys of a keras-hub backbone's
`get_layout_map`, so an adapter path can never match two keys.
"""

import keras

from keras_relora.layers.relora_dense import ReloraDense


def _replicated(shape_rank):
    return (None,) * shape_rank


def b_kernel_axes(layer, layout_map):
    """The mesh axes of the B of an adapter of `layer`.

    Args:
        layer: The base `Dense` or `EinsumDense` layer (built).
        layout_map: A `keras.distribution.LayoutMap`.

    Returns:
        A tuple of 3 mesh axis names or `None`s, for
        `(experts, rank, d_out)`.
    """
    kernel_layout = layout_map[layer.kernel.path]
    if kernel_layout is None:
        return _replicated(3)
    axes = ReloraDense.axes_of(layer)
    free = axes.kernel_to_2d[len(axes.in_shape) :]
    out_axes = [kernel_layout.axes[i] for i in free]
    if (
        out_axes
        and out_axes[0] is not None
        and all(a is None for a in out_axes[1:])
    ):
        return (None, None, out_axes[0])
    return _replicated(3)


def check_layout_map(layout_map):
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise ValueError(
            "`layout_map` must be a `keras.distribution.LayoutMap` (the one "
            "the active `keras.distribution.ModelParallel` was built with, "
            "e.g. `Llama3Backbone.get_layout_map(mesh)`), or None. "
            f"Received: layout_map of type {type(layout_map).__name__}"
        )


def register(layout_map, path, axes):
    """Sets the exact entry `path` of `layout_map` to `axes`."""
    # `in` on a LayoutMap matches its regex keys too: compare exact keys.
    if path in list(layout_map):
        del layout_map[path]
    layout_map[path] = axes


def adapter_layouts(layout_map, layer, path, experts):
    """Variable path -> mesh axes, for the `ReloraDense` of `layer`."""
    layouts = {
        f"{path}/relora/b_kernel": b_kernel_axes(layer, layout_map),
        f"{path}/relora/suppression": (),
    }
    if experts > 1:
        layouts[f"{path}/relora/router_kernel"] = _replicated(2)
    return layouts


def check_paths(expected, variables):
    """Raises if a laid-out path is not among the created variables'."""
    missing = sorted(set(expected) - {v.path for v in variables})
    if missing:
        raise RuntimeError(
            "keras_relora could not lay out its adapter variables: it "
            f"registered layouts for {missing}, which no created variable "
            "has. Please report this with your model's class."
        )
