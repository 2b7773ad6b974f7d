"""Where the Reducer's probe batches come from: a fresh batch per probe."""

import keras
import numpy as np
from keras import ops

from keras_relora.adapt.state import require_state

DEFAULT_PROBE_BATCH = 16
# Rows of a probe batch that run through the model at a time.
DEFAULT_PROBE_CHUNK = 4
# Separates the probe's draws from the other uses of the Reducer's seed.
_SALT = 0x5EED0F


class ProbeBatches:
    """The Reducer's probe batches: `batch(i)` is the batch of probe `i`.

    Probe `i` is counted from the first step of training, so that a
    resumed run probes the batches an uninterrupted one would. As IST's
    probe (a shuffled `DataLoader` of the training data, batch 16, drawn
    from again when exhausted), each probe draws a fresh random batch:

    * arrays `(x, y[, sample_weight])` (`probe_data`, or the arrays the
      latest `fit` call received, without the rows `validation_split`
      holds out): the rows are shuffled, one permutation per pass seeded
      by `(seed, pass)`, and probe `i` takes the next `batch_size` rows
      of it. A pass has `rows // batch_size` batches (the rows left over
      go to the next pass's shuffle), so every batch has the same shape
      (one trace of the compiled predict step) and every replica or
      process with the same seed draws the same rows;
    * a `keras.utils.PyDataset`: one of its batches, in a seeded shuffled
      order of its batches, pass after pass;
    * another re-iterable dataset (`tf.data.Dataset`, a torch
      `DataLoader`): its successive batches, again from its start when it
      is exhausted; shuffle it (`Dataset.shuffle`, `DataLoader(shuffle=
      True)`) for random batches. Datasets keep their own batch size.

    A keras-hub task's batch goes through its preprocessor here. Batches
    are host (numpy) arrays.

    Args:
        model: The adapted, compiled model.
        probe_data: The `ReducerCallback`'s `probe_data` argument.
        batch_size: int. Rows of a probe batch drawn from arrays.
        seed: int. The Reducer's seed.
    """

    def __init__(
        self, model, probe_data, batch_size=DEFAULT_PROBE_BATCH, seed=0
    ):
        self._model = model
        self._seed = int(seed)
        rows = None  # All rows, unless `validation_split` holds some out.
        if probe_data is not None:
            what, self._name = "`probe_data`", "probe_data"
            data = probe_data
            if isinstance(data, (list, tuple)) and not _is_string_list(data):
                data = tuple(data) + (None,) * (3 - len(data))
            elif _is_array_like(data):
                data = _inputs_only(model, data)
        else:
            what, self._name = "the training data", "x"
            state = require_state(model, "`ReducerCallback`")
            fit_data = state.fit_data
            if fit_data is None or fit_data["x"] is None:
                raise ValueError(
                    "`ReducerCallback` found no training data to draw probe "
                    "batches from. Pass `probe_data=(x, y)`."
                )
            data = fit_data["x"]
            if _is_array_like(data):
                data = (data, fit_data["y"], fit_data["sample_weight"])
                split = fit_data.get("validation_split") or 0.0
                if split:
                    # Keras holds out the last rows (`fit`'s own split).
                    total = _num_rows(data, what, self._name)
                    rows = int(np.floor(total * (1.0 - split)))
        self._what = what
        if isinstance(data, tuple):
            self._arrays = data
            self._rows = rows or _num_rows(data, what, self._name)
            self._size = min(int(batch_size), self._rows)
            self._pass = None  # `(pass, permutation)` of the latest pass.
        else:
            self._arrays = None
            self._dataset = _check_dataset(data, what)
            self._iterator = None
            self._position = 0
            self._count = None  # Batches in the dataset, once known.
            self._pass = None  # `(pass, order of the PyDataset's batches)`.
            first = self._raw(0)  # Fails now if the dataset is empty.
            self._cached = (0, first)

    def rows(self, index):
        """The row indices of probe `index` (arrays only)."""
        per_pass = self._rows // self._size
        number, start = divmod(index, per_pass)
        permutation = self._permutation(number, self._rows)
        return permutation[start * self._size : (start + 1) * self._size]

    def _permutation(self, number, count):
        if self._pass is None or self._pass[0] != number:
            rng = np.random.default_rng([self._seed, _SALT, number])
            self._pass = (number, rng.permutation(count))
        return self._pass[1]

    def batch(self, index):
        """`(x, y, sample_weight)` of probe `index`, preprocessed, on host."""
        if self._arrays is not None:
            rows = self.rows(index)
            batch = tuple(take_rows(part, rows) for part in self._arrays)
        elif self._cached is not None and self._cached[0] == index:
            batch = self._cached[1]
        else:
            batch = self._raw(index)
        self._cached = None
        return _prepare(self._model, batch)

    def _raw(self, index):
        data = self._dataset
        if isinstance(data, keras.utils.PyDataset):
            count = len(data)
            if count == 0:
                self._empty()
            number, position = divmod(index, count)
            order = self._permutation(number, count)
            return _unpack(data[int(order[position])])
        if self._count is not None:
            index %= self._count
        if self._iterator is None or index < self._position:
            self._iterator, self._position = iter(data), 0
        while self._position <= index:
            try:
                batch = next(self._iterator)
            except StopIteration:  # Exhausted: start again from the top.
                self._count = self._position
                if self._count == 0:
                    self._empty()
                index %= self._count
                self._iterator, self._position = iter(data), 0
                continue
            self._position += 1
        return _unpack(batch)

    def _empty(self):
        raise ValueError(
            f"{self._what} is empty: the Reducer's probes need at least one "
            "batch. Pass `probe_data=` with samples in it. "
            f"Received: {self._name} with no batch"
        )


def _inputs_only(model, data):
    """`(x, None, None)` for a task whose preprocessor makes the targets."""
    if getattr(model, "preprocessor", None) is not None:
        return (data, None, None)
    kind = (
        f"a dict with keys {sorted(data)}"
        if isinstance(data, dict)
        else type(data).__name__
    )
    raise ValueError(
        "`probe_data` takes what `fit` takes as data: a tuple `(x, y)` or "
        "`(x, y, sample_weight)` of arrays (x may be a dict of arrays), or "
        "a dataset of such batches. It received inputs alone, and the "
        "probe loss needs targets (only a keras-hub task with a "
        "preprocessor makes its targets from the inputs). Pass "
        f"`probe_data=(x, y)`. Received: probe_data={kind}"
    )


def _check_dataset(data, what):
    if isinstance(data, keras.utils.PyDataset):
        return data
    if hasattr(data, "__next__"):
        raise ValueError(
            f"`ReducerCallback` cannot draw probe batches from {what}: it is "
            "an iterator (a generator), and taking a batch would take it "
            "from training (nor can it start again when exhausted). Pass "
            "`probe_data=(x, y)` or a re-iterable dataset. "
            f"Received: {type(data).__name__}"
        )
    if not hasattr(data, "__iter__"):
        raise ValueError(
            f"`ReducerCallback` cannot draw probe batches from {what}. Pass "
            "`probe_data=(x, y)`, `(x, y, sample_weight)` or a dataset. "
            f"Received: {type(data).__name__}"
        )
    return data


def _num_rows(arrays, what, name):
    counts = {
        len(leaf)
        for part in arrays
        if part is not None
        for leaf in _parts(part)
    }
    if len(counts) != 1:
        raise ValueError(
            f"The arrays of {what} must all have the same number of "
            f"samples. Received: sample counts {sorted(counts)}"
        )
    rows = counts.pop()
    if rows == 0:
        raise ValueError(
            f"{what} is empty: the Reducer's probes need at least one "
            f"sample. Pass `probe_data=` with samples in it. "
            f"Received: {name} with 0 samples"
        )
    return rows


def _unpack(batch):
    batch = keras.utils.unpack_x_y_sample_weight(batch)
    return tuple(batch) + (None,) * (3 - len(batch))


def _prepare(model, batch):
    """Preprocesses a keras-hub task's batch (as its `fit` does); host."""
    if getattr(model, "preprocessor", None) is not None:
        preprocess = getattr(model, "preprocess_samples", None)
        if preprocess is None:
            preprocess = model.preprocessor
        batch = _strings_to_python(batch)
        batch = _unpack(preprocess(*batch))
    return tuple(
        None if part is None else keras.tree.map_structure(_host, part)
        for part in batch
    )


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


def take_rows(x, rows):
    """The samples `rows` (indices) of arrays or lists of strings, or of
    dicts, lists and tuples of them; None stays None."""
    if x is None:
        return None
    if _is_string_list(x):
        return [x[int(row)] for row in rows]
    if isinstance(x, dict):
        return {key: take_rows(value, rows) for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(take_rows(value, rows) for value in x)
    return np.take(_host(x), rows, axis=0)


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


def _host(value):
    """A numpy copy of a tensor from any framework (TF tensors included)."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("tensorflow"):
        return np.asarray(value)
    return ops.convert_to_numpy(value)
