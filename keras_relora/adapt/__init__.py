"""Adapting a model: `enable_relora`, targets, variants, layouts, reports,
and the adapter state (`adapt.state`) that the other rooms read."""

from keras_relora.adapt.budget import budget
from keras_relora.adapt.enable_relora import enable_relora
from keras_relora.adapt.enable_relora import report
from keras_relora.adapt.report import ReloraReport
from keras_relora.adapt.state import get_state
from keras_relora.adapt.variants import VARIANTS
from keras_relora.adapt.variants import paper_defaults

__all__ = [
    "ReloraReport",
    "VARIANTS",
    "budget",
    "enable_relora",
    "get_state",
    "paper_defaults",
    "report",
]
