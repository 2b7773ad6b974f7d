"""The adapter layers: the formula, depending on Keras alone."""

from keras_relora.layers.relora_dense import ReloraDense
from keras_relora.layers.shared_lora_a import SharedLoraA

__all__ = [
    "ReloraDense",
    "SharedLoraA",
]
