"""Where the Reducer's probe batches come from."""

import keras
import numpy as np
from keras import ops

from keras_relora.adapt.state import require_state

_DEFAULT_PROBE_BATCH = 32


def probe_batch(model, probe_data):
    """`(batch, preprocessed)`: the Reducer's probe batch, host arrays.

    From `probe_data` if given, else the head of the training data that
    the latest `model.fit` call received. A keras-hub task's batch goes
    through its preprocessor here (`preprocessed` is then True).
    """
    if probe_data is not None:
        data, batch_size = probe_data, None
        if isinstance(data, (list, tuple)):
            batch = tuple(data) + (None,) * (3 - len(data))
        else:
            batch = _first_batch(data, "probe_data")
    else:
        state = require_state(model, "`ReducerCallback`")
        fit_data = state.fit_data
        if fit_data is None or fit_data["x"] is None:
            raise ValueError(
                "`ReducerCallback` found no training data to hold a "
                "probe batch from. Pass `probe_data=(x, y)`."
            )
        batch_size = fit_data["batch_size"] or _DEFAULT_PROBE_BATCH
        x = fit_data["x"]
        if _is_array_like(x):
            batch = tuple(
                None if part is None else _head(part, batch_size)
                for part in (x, fit_data["y"], fit_data["sample_weight"])
            )
        else:
            batch = _first_batch(x, "the training data")
    # Preprocess once here, as a keras-hub task's `fit` does with every
    # batch, so that each probe only runs the compiled test step.
    preprocessed = getattr(model, "preprocessor", None) is not None
    if preprocessed:
        preprocess = getattr(model, "preprocess_samples", None)
        if preprocess is None:
            preprocess = model.preprocessor
        batch = _strings_to_python(batch)
        batch = keras.utils.unpack_x_y_sample_weight(preprocess(*batch))
        batch = tuple(batch) + (None,) * (3 - len(batch))
    batch = tuple(
        None if part is None else keras.tree.map_structure(_host, part)
        for part in batch
    )
    return batch, preprocessed


def _is_string_list(x):
    return (
        isinstance(x, (list, tuple))
        and bool(x)
        and all(isinstance(item, (str, bytes)) for item in x)
    )


def _parts(x):
    """The leaves of `x`, a list of strings counting as one leaf."""
    if _is_string_list(x):
        return [x]
    if isinstance(x, dict):
        return [leaf for value in x.values() for leaf in _parts(value)]
    if isinstance(x, (list, tuple)):
        return [leaf for value in x for leaf in _parts(value)]
    return [x]


def _is_array_like(x):
    """Whether `x` is arrays (or lists of strings) to slice a batch from."""
    leaves = _parts(x)
    return bool(leaves) and all(
        hasattr(leaf, "shape") or _is_string_list(leaf) for leaf in leaves
    )


def _head(x, size):
    """The first `size` samples of arrays or lists of strings."""
    if _is_string_list(x):
        return list(x[:size])
    if isinstance(x, dict):
        return {key: _head(value, size) for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_head(value, size) for value in x)
    return x[:size]


def _strings_to_python(batch):
    """Numpy string arrays as lists of `str`, which preprocessors take."""

    def convert(x):
        if isinstance(x, np.ndarray) and x.dtype.kind in "OSU":
            return [
                item.decode("utf-8") if isinstance(item, bytes) else item
                for item in x.tolist()
            ]
        if isinstance(x, dict):
            return {key: convert(value) for key, value in x.items()}
        if isinstance(x, (list, tuple)) and not _is_string_list(x):
            return type(x)(convert(value) for value in x)
        return x

    return tuple(convert(part) for part in batch)


def _first_batch(data, what):
    """The first batch of a dataset, without consuming a user's iterator."""
    if hasattr(data, "take") and hasattr(data, "element_spec"):  # tf.data
        batch = next(iter(data.take(1)))
    elif isinstance(data, keras.utils.PyDataset):
        batch = data[0]
    elif hasattr(data, "__next__"):
        raise ValueError(
            f"`ReducerCallback` cannot hold a probe batch from {what}: it is "
            "an iterator (a generator), and taking a batch would take it "
            "from training. Pass `probe_data=(x, y)`. "
            f"Received: {type(data).__name__}"
        )
    elif hasattr(data, "__iter__"):  # e.g. a torch DataLoader
        batch = next(iter(data))
    else:
        raise ValueError(
            f"`ReducerCallback` cannot hold a probe batch from {what}. Pass "
            "`probe_data=(x, y)` or `(x, y, sample_weight)`. "
            f"Received: {type(data).__name__}"
        )
    batch = keras.utils.unpack_x_y_sample_weight(batch)
    return tuple(batch) + (None,) * (3 - len(batch))


def _host(value):
    """A numpy copy of a tensor from any framework (TF tensors included)."""
    if type(value).__module__.startswith("tensorflow"):
        return np.asarray(value)
    return ops.convert_to_numpy(value)
