"""keras_relora: Resource-Efficient Low-Rank Adaptation for Keras 3."""

from keras_relora.relora_dense import ReloraDense
from keras_relora.shared_lora_a import SharedLoraA

__version__ = "0.1.0"
