"""keras_relora: Resource-Efficient Low-Rank Adaptation for Keras 3.

Importing the package adds `enable_relora` to every `keras.Model`.
"""

import importlib.metadata

import keras

from keras_relora.adapt import VARIANTS
from keras_relora.adapt import ReloraReport
from keras_relora.adapt import active_adapter
from keras_relora.adapt import adapter_names
from keras_relora.adapt import budget
from keras_relora.adapt import combine_adapters
from keras_relora.adapt import delete_adapter
from keras_relora.adapt import disable_adapters
from keras_relora.adapt import enable_relora
from keras_relora.adapt import get_state
from keras_relora.adapt import paper_defaults
from keras_relora.adapt import report
from keras_relora.adapt import route_examples
from keras_relora.adapt import set_adapter
from keras_relora.adapt import unload
from keras_relora.layers import ReloraDense
from keras_relora.layers import SharedLoraA
from keras_relora.reducer import ReducerCallback
from keras_relora.reducer import prune
from keras_relora.saving import ReloraModel
from keras_relora.saving import load_peft
from keras_relora.saving import load_relora_weights
from keras_relora.saving import merge_relora
from keras_relora.saving import save_peft
from keras_relora.saving import save_relora_weights

# The version is pyproject.toml's, read from the installed package.
try:
    __version__ = importlib.metadata.version("keras-relora")
except importlib.metadata.PackageNotFoundError:  # A source tree, not installed.
    __version__ = "unknown"

__all__ = [
    "VARIANTS",
    "ReducerCallback",
    "ReloraDense",
    "ReloraModel",
    "ReloraReport",
    "SharedLoraA",
    "active_adapter",
    "adapter_names",
    "budget",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "enable_relora",
    "get_state",
    "load_peft",
    "load_relora_weights",
    "merge_relora",
    "paper_defaults",
    "prune",
    "report",
    "route_examples",
    "save_peft",
    "save_relora_weights",
    "set_adapter",
    "unload",
]


def _install_method(function):
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    method.__name__ = function.__name__
    method.__doc__ = function.__doc__
    setattr(keras.Model, function.__name__, method)


def _install_model_methods():
    def enable(self, rank=16, experts=4, **kwargs):
        return enable_relora(self, rank, experts, **kwargs)

    enable.__doc__ = enable_relora.__doc__
    keras.Model.enable_relora = enable

    def save_weights(self, filepath, adapter_name=None):
        return save_relora_weights(self, filepath, adapter_name=adapter_name)

    def load_weights(self, filepath, adapter_name=None, *, check_base=True):
        return load_relora_weights(
            self, filepath, check_base=check_base, adapter_name=adapter_name
        )

    for function in (
        active_adapter,
        adapter_names,
        combine_adapters,
        delete_adapter,
        disable_adapters,
        route_examples,
        set_adapter,
    ):
        _install_method(function)

    save_weights.__doc__ = save_relora_weights.__doc__
    load_weights.__doc__ = load_relora_weights.__doc__
    keras.Model.save_relora_weights = save_weights
    keras.Model.load_relora_weights = load_weights


_install_model_methods()
