"""The Reducer (paper §3.2): block scores, sampling, the exact per-block
freeze in the optimizer step, and static pruning."""

from keras_relora.reducer.prune import prune
from keras_relora.reducer.reducer_callback import ReducerCallback

__all__ = [
    "ReducerCallback",
    "prune",
]
