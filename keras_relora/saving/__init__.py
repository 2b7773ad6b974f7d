"""Saving and serving: adapter files, `.keras` loading, PEFT folders, merge."""

from keras_relora.saving.checkpoint import load_relora_weights
from keras_relora.saving.checkpoint import save_relora_weights
from keras_relora.saving.merge import merge_relora
from keras_relora.saving.model_saving import ReloraModel
from keras_relora.saving.peft_format import save_peft
from keras_relora.saving.peft_loading import load_peft

__all__ = [
    "ReloraModel",
    "load_peft",
    "load_relora_weights",
    "merge_relora",
    "save_peft",
    "save_relora_weights",
]
