"""keras-hub Llama backbones whose config omits `tie_word_embeddings`.

Used by `.keras` saving (`adapt.model_class`) and `merge_relora`.
"""

from keras_relora import _keras_internals
from keras_relora.adapt.state import adapted_model


def omitted_tied_embeddings(model):
    """The backbone's `tie_word_embeddings` where its config leaves it out.

    keras-hub (0.32) Llama backbones take `tie_word_embeddings` (SmolLM2,
    Llama 3.2) but their `get_config` omits it, so a backbone rebuilt from
    its config, a preset or a `.keras` file gets an untied output head with
    one more weight ("expected 2 variables" on load). Returns `None` where
    the config is complete.
    """
    backbone = adapted_model(model)
    tied = getattr(backbone, "tie_word_embeddings", None)
    if not isinstance(tied, bool):
        return None
    if "tie_word_embeddings" in base_config(backbone):
        return None
    return tied


def base_config(model):
    """`model.get_config()` of its own class (not the saving subclass's)."""
    cls = type(model)
    return (getattr(cls, "_relora_base_class", None) or cls).get_config(model)


def add_tied_embeddings(serialized, tied):
    """Writes `tie_word_embeddings` into a serialized model or task config.

    `serialized` is `keras.saving.serialize_keras_object(model)` of the
    backbone or of a task holding it; `tied` comes from
    `omitted_tied_embeddings` (None: nothing to add).
    """
    if tied is None:
        return
    config = serialized["config"]
    if config.get("backbone") is not None:  # A task: its backbone's config.
        config = config["backbone"]["config"]
    config["tie_word_embeddings"] = tied


def keep_tied_embeddings_in_config(backbone, tied):
    """Adds `tie_word_embeddings` to this backbone's `get_config`.

    On the instance only, so a merged model stays of the original class,
    and its `save_to_preset` and `.keras` files rebuild it with the right
    head.
    """
    get_config = backbone.get_config

    def get_config_with_tied_embeddings():
        return {**get_config(), "tie_word_embeddings": tied}

    _keras_internals.set_untracked(
        backbone, "get_config", get_config_with_tied_embeddings
    )
