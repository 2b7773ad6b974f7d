"""Keras's int4 `ReversibleEmbedding` through a `.keras` file.

`model.quantize("int4")` quantizes a `ReversibleEmbedding`'s weights only
(`keras.quantizers.Int4QuantizationConfig`'s default has no activation
quantizer), but Keras (3.15) rebuilds the layer from a file without its
quantization config and gives it an `AbsMaxQuantizer` for its inputs: the
reverse call (a language model's head, e.g. Gemma 3's and SmolLM2's tied
one) then rounds the hidden states to int8, and the loaded model's logits
differ from the saved model's (by ~1e-2 on a tiny Gemma 3). An adapted
model's `.keras` file records these layers (`adapt.model_class`) and its
loader (`saving.model_saving`) rebuilds them weight-only again.
"""

import keras

from keras_relora import _keras_internals
from keras_relora.adapt.targets import relative_path


def weight_only_int4_embeddings(model):
    """Relative paths of the int4 `ReversibleEmbedding`s without an
    activation quantizer, in layer order."""
    return [
        relative_path(model, layer.path)
        for layer in _int4_embeddings(model)
        if layer.inputs_quantizer is None
    ]


def restore_weight_only_int4(model, paths):
    """Removes the activation quantizer of the layers at `paths` (from
    `weight_only_int4_embeddings` of the saved model)."""
    layers = {
        relative_path(model, layer.path): layer
        for layer in _int4_embeddings(model)
    }
    missing = [p for p in paths if p not in layers]
    if missing:
        raise ValueError(
            f"Cannot restore model {model.name!r}: the saved int4 "
            f"`ReversibleEmbedding` layers {missing} are not int4 "
            "`ReversibleEmbedding` layers of the rebuilt model. It differs "
            "from the saved one (another config, or layers named "
            "differently)."
        )
    for path in paths:
        layers[path].inputs_quantizer = None


def _int4_embeddings(model):
    return [
        layer
        for layer in _keras_internals.flatten_layers(model)
        if isinstance(layer, keras.layers.ReversibleEmbedding)
        and layer.quantization_mode == "int4"
    ]
