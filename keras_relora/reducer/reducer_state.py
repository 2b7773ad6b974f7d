"""The Reducer's model-side state: block scores and the sampling seed.

Its variables (`adapt.state.ReducerVariables`) are part of the model's
`ReloraState` (`state.reducer`), so saving carries them and `unload`
removes them.
"""

from keras_relora.adapt.state import get_state
from keras_relora.adapt.state import require_state


def reducer_state(model, create_seed=None):
    """The Reducer's variables of `model`; made with `create_seed` if
    missing (None: not made)."""
    state = require_state(model, "`ReducerCallback`")
    if state.reducer is None and create_seed is not None:
        state.add_reducer(model, create_seed)
    return state.reducer


def existing_reducer_state(model):
    """The Reducer's variables of `model`, or None (no adapters or no
    Reducer attached; no `require_state` check)."""
    state = get_state(model)
    return None if state is None else state.reducer
