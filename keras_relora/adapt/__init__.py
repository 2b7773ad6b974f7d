"""Adapting a model: `enable_relora` and `unload`, targets, variants,
layouts, reports, the class an adapted model saves with, and the record of
what enabling changed (`adapt.state`), which the other sub-packages read."""

from keras_relora.adapt.budget import budget
from keras_relora.adapt.combine import combine_adapters
from keras_relora.adapt.enable_relora import enable_relora
from keras_relora.adapt.enable_relora import unload
from keras_relora.adapt.named_adapters import active_adapter
from keras_relora.adapt.named_adapters import adapter_names
from keras_relora.adapt.named_adapters import delete_adapter
from keras_relora.adapt.named_adapters import disable_adapters
from keras_relora.adapt.named_adapters import route_examples
from keras_relora.adapt.named_adapters import set_adapter
from keras_relora.adapt.report import ReloraReport
from keras_relora.adapt.report import report
from keras_relora.adapt.state import get_state
from keras_relora.adapt.variants import VARIANTS
from keras_relora.adapt.variants import paper_defaults

__all__ = [
    "ReloraReport",
    "VARIANTS",
    "active_adapter",
    "adapter_names",
    "budget",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "enable_relora",
    "get_state",
    "paper_defaults",
    "report",
    "route_examples",
    "set_adapter",
    "unload",
]
