"""Tiny random configs of every model family the package supports, and
bitwise snapshots of a model's weights.

No downloads: every model here is built from a config small enough to train
a few steps on CPU in a second or two.
"""

import keras
import keras_hub
import numpy as np
from keras import ops

VOCAB = 64


def llama3_backbone(
    num_layers=2,
    dtype=None,
    tie_word_embeddings=False,
    vocabulary_size=VOCAB,
    hidden_dim=8,
):
    return keras_hub.models.Llama3Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        dtype=dtype,
        tie_word_embeddings=tie_word_embeddings,
    )


def llama3_causal_lm(num_layers=2, dtype=None, tie_word_embeddings=False):
    backbone = llama3_backbone(
        num_layers, dtype=dtype, tie_word_embeddings=tie_word_embeddings
    )
    return keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)


def llama3_causal_lm_with_preprocessor(
    tokenizer, sequence_length, hidden_dim=8
):
    """A 2-block random Llama 3 task that preprocesses raw strings."""
    backbone = llama3_backbone(
        vocabulary_size=tokenizer.vocabulary_size(), hidden_dim=hidden_dim
    )
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length, add_start_token=False
    )
    return keras_hub.models.Llama3CausalLM(backbone, preprocessor)


def gemma3_backbone(seed=0, **config):
    """A 6-block random Gemma 3 text backbone that keeps what sets Gemma 3
    apart: tied embeddings, the embedding scale, query/key norms, the four
    block norms (random, non-zero scales), and five sliding-window blocks
    then a global one (window 4). `config` overrides the constructor's
    arguments (e.g. `final_logit_soft_cap`)."""
    kwargs = dict(
        vocabulary_size=VOCAB,
        image_size=None,
        num_layers=6,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,
        vision_encoder=None,
    )
    backbone = keras_hub.models.Gemma3Backbone(**{**kwargs, **config})
    # Gemma's RMS norms scale by `1 + scale`, initialized to 0: random
    # scales make a dropped or misplaced norm weight visible.
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.path.endswith("/scale"):
            variable.assign(
                rng.normal(0, 0.5, variable.shape).astype("float32")
            )
    return backbone


def gemma3_causal_lm(seed=0, **config):
    return keras_hub.models.Gemma3CausalLM(
        backbone=gemma3_backbone(seed, **config), preprocessor=None
    )


def quantize(model, mode):
    """`model.quantize(mode)`, the way `enable_relora` accepts it.

    With int8, `ReversibleEmbedding` layers stay float: Keras's int8
    `ReversibleEmbedding` gives its inputs no gradient in its reverse call
    (a language model's head), and `enable_relora` refuses it.
    """
    filters = None
    if mode == "int8":

        def filters(layer):
            return not isinstance(layer, keras.layers.ReversibleEmbedding)

    model.quantize(mode, filters=filters)


def input_gradient(fn, x):
    """`d sum(fn(x)) / dx` as numpy, on the running backend."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: fn(v).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            total = tf.reduce_sum(fn(v))
        return tape.gradient(total, v).numpy()
    import torch

    v = torch.tensor(x, requires_grad=True)
    fn(v).sum().backward()
    return v.grad.numpy()


def byte_tokenizer():
    """A Llama 3 tokenizer over the 256 byte-level symbols (no files)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable]
    symbols += [chr(256 + i) for i in range(256 - len(printable))]
    merges = ["c a", "d o"]  # An empty merge list breaks the BPE table.
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tokens = [
        "<pad>",
        *specials,
        *symbols,
        *(m.replace(" ", "") for m in merges),
    ]
    return keras_hub.models.Llama3Tokenizer(
        vocabulary={token: i for i, token in enumerate(tokens)},
        merges=merges,
    )


def token_batch(batch=4, seq=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1, VOCAB, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def lm_data(batch=4, seq=6, seed=0):
    """(x, y, sample_weight) for a CausalLM fit on random tokens."""
    x = token_batch(batch, seq, seed)
    y = np.roll(x["token_ids"], -1, axis=1)
    return x, y, np.ones_like(y, dtype="float32")


def paligemma_backbone():
    return keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=VOCAB,
        image_size=16,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        vit_patch_size=4,
        vit_num_heads=2,
        vit_hidden_dim=8,
        vit_num_layers=2,
        vit_intermediate_dim=16,
    )


def paligemma_data(batch=2, seq=6, seed=0):
    rng = np.random.default_rng(seed)
    x = token_batch(batch, seq, seed)
    x["images"] = rng.uniform(-1, 1, (batch, 16, 16, 3)).astype("float32")
    x["response_mask"] = np.ones((batch, seq), "int32")
    y = np.roll(x["token_ids"], -1, axis=1)
    return x, y


def bert_backbone():
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )


def bert_data(batch=4, seq=6, seed=0):
    x = token_batch(batch, seq, seed)
    x["segment_ids"] = np.zeros((batch, seq), "int32")
    return x


def clip_text_encoder(name=None, hidden_dim=8):
    return keras_hub.models.CLIPTextEncoder(
        vocabulary_size=VOCAB,
        embedding_dim=hidden_dim,
        hidden_dim=hidden_dim,
        num_layers=2,
        num_heads=2,
        intermediate_dim=16,
        intermediate_activation="quick_gelu",
        intermediate_output_index=0,
        name=name,
    )


def stable_diffusion3_backbone(image_size=16):
    vae = _vae()
    return keras_hub.models.StableDiffusion3Backbone(
        mmdit_patch_size=2,
        mmdit_hidden_dim=16,
        mmdit_num_layers=2,
        mmdit_num_heads=2,
        mmdit_position_size=16,
        mmdit_qk_norm=None,
        mmdit_dual_attention_indices=None,
        vae=vae,
        clip_l=clip_text_encoder("clip_l", hidden_dim=8),
        clip_g=clip_text_encoder("clip_g", hidden_dim=8),
        latent_channels=4,
        image_shape=(image_size, image_size, 3),
    )


def _vae():
    # keras_hub.models does not export VAEBackbone: import it from its module.
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    return VAEBackbone(
        encoder_num_filters=[32, 32],
        encoder_num_blocks=[1, 1],
        decoder_num_filters=[32, 32],
        decoder_num_blocks=[1, 1],
        sampler_method="mode",
        input_channels=3,
        sample_channels=8,
        output_channels=3,
    )


def functional_model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(12, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(12, activation="relu", name="hidden_2")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


class TwoBlockMLP(keras.Model):
    """A subclassed model with two residual blocks of two Dense layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [
            [
                keras.layers.Dense(16, activation="relu", name=f"up_{i}"),
                keras.layers.Dense(6, name=f"down_{i}"),
            ]
            for i in range(2)
        ]
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        for up, down in self.blocks:
            x = x + down(up(x))
        return self.head(x)


def subclassed_model():
    model = TwoBlockMLP()
    model(np.zeros((1, 6), "float32"))
    return model


def block_mlp(num_blocks=4):
    """A functional MLP (6 -> 3) whose Dense layers `layer_<i>` are the
    Reducer's blocks, and a `head`."""
    inputs = keras.Input((6,))
    x = inputs
    for i in range(num_blocks):
        x = keras.layers.Dense(6, activation="tanh", name=f"layer_{i}")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def adapted_block_mlp():
    """`block_mlp()` seeded, with 2 B experts of rank 2 per block, compiled
    (Adam 0.05, mse)."""
    keras.utils.set_random_seed(0)
    model = block_mlp()
    model.enable_relora(rank=2, experts=2, targets=r"layer_\d")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def dense_data(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 6)).astype("float32")
    y = rng.normal(size=(batch, 3)).astype("float32")
    return x, y


def randomize_adapters(model, seed=0, scale=0.3):
    """Non-zero adapters (at init B = 0 and the adapters change nothing):
    every trainable ReLoRA variable of `model` drawn from N(0, scale^2)."""
    import keras_relora

    rng = np.random.default_rng(seed)
    for variable in keras_relora.get_state(model).variables().values():
        if variable.trainable:
            variable.assign(
                rng.normal(size=variable.shape).astype("float32") * scale
            )


def snapshot(model):
    """A copy of every weight of `model` (`model.weights`: trainable and
    non-trainable), as `{path: numpy array}` in that order."""
    return {v.path: np.array(ops.convert_to_numpy(v)) for v in model.weights}


def assert_unchanged(model, before, ignore=()):
    """Checks that `model` holds the weights of `before` (a `snapshot`), the
    same paths in the same order, each bitwise equal (dtype, shape, bytes),
    but for the paths in `ignore` (e.g. the trainable ones), whose values
    are not compared."""
    after = snapshot(model)
    assert list(after) == list(before), "the weight paths changed"
    for path, value in before.items():
        if path in ignore:
            continue
        now = after[path]
        assert (now.dtype, now.shape) == (value.dtype, value.shape), path
        if now.tobytes() != value.tobytes():
            np.testing.assert_array_equal(now, value, err_msg=path)
            raise AssertionError(f"{path}: equal values, other bits")
