"""`budget`: plan an adapter's size from a backbone config alone."""

import keras

from keras_relora import _keras_internals
from keras_relora.adapt.enable_relora import enable_relora


def budget(backbone_cls, config, **enable_kwargs):
    """The `ReloraReport` of a backbone config, without allocating weights.

    The backbone is built inside a `keras.StatelessScope`, where Keras
    defers variable initialisation, so only shapes exist: planning a
    Llama-3-8B adapter takes seconds and no memory for its weights.

    Args:
        backbone_cls: A keras-hub backbone class (or any `keras.Model`
            class built by its constructor), e.g.
            `keras_hub.models.Llama3Backbone`.
        config: dict. Constructor arguments of `backbone_cls`.
        **enable_kwargs: Arguments of `enable_relora` (`rank`, `experts`,
            `targets`, `share_a`, ...).

    Returns:
        A `ReloraReport`, the same `enable_relora` returns on a real model.

    Example:

    ```python
    report = keras_relora.budget(
        keras_hub.models.Llama3Backbone, llama3_8b_config, rank=16,
        **keras_relora.VARIANTS["lora"],
    )
    ```
    """
    with keras.StatelessScope(initialize_variables=False):
        model = backbone_cls(**config)
        report = enable_relora(model, **enable_kwargs)
    # Keras queues deferred variables for the next global initialisation
    # (the next model build or load would allocate all 8B weights): make
    # this throw-away model's variables opt out of it.
    for variable in model.weights:
        _keras_internals.skip_deferred_initialization(variable)
    return report
