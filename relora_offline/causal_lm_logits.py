"""Logits of a keras-hub `CausalLM` where a scorer or a loss reads them.

For training with a loss on a few tokens per row (the answers),
`position_logits_model` computes the vocabulary projection only at the
positions that `weighted_positions` keeps. For scoring, two ways to run
the model, both one compiled function per input shape:

* per sequence (`__call__`): each row is a whole sequence; the vocabulary
  projection is computed only at the gathered `positions`;
* each context once (`context_logits`): a batch of contexts runs once, and
  the continuations run from the contexts' key/value cache, as keras-hub's
  `call_with_cache` does for generation. A multiple-choice document's
  context is shared by its 2-4 answers, so this computes it once instead
  of once per answer. It returns log-probabilities, computed in the
  model: of every token after each context, and of each continuation's
  next token only, not a vocabulary of logits per continuation token.

Contexts are padded on the left, so that every context of a batch ends at
the same position and the continuations start at one cache index. Rotary
position embeddings depend only on the distance between two tokens, so a
context shifted to the right gives the same attention scores (up to float
rounding); the left padding is masked out.
"""

import numpy as np


def shares_context(causal_lm):
    """Whether `KerasLogits.context_logits` supports this model.

    The Llama family (`keras_hub.models.LlamaBackbone` and its subclass
    `Llama3Backbone`): token embedding, decoder blocks that take
    `decoder_attention_mask` and a key/value cache, final norm.
    """
    import keras_hub

    return isinstance(causal_lm.backbone, keras_hub.models.LlamaBackbone)


class KerasLogits:
    """Logits of a keras-hub `CausalLM` at the positions a scorer reads.

    Args:
        causal_lm: a `keras_hub.models.CausalLM` whose backbone reads
            `token_ids` and `padding_mask` and has a `token_embedding`
            (Llama 3, Llama, Mistral, ...), adapted or not.
        jit_compile: `"auto"` (Keras's choice: XLA on JAX, and on
            TensorFlow only with an accelerator) or a bool, as
            `Model.compile` takes it.
        share_context: `"auto"` (when `shares_context(causal_lm)`) or a
            bool. With `False`, only the per-sequence call is offered.

    Attributes:
        fixed_shapes: bool. Whether each new input shape costs a
            compilation or a trace (JAX, TensorFlow, torch with
            `jit_compile`); if not (torch eager), a scorer gains nothing
            from padding to few shapes.
    """

    def __init__(self, causal_lm, jit_compile="auto", share_context="auto"):
        import keras

        if share_context == "auto":
            share_context = shares_context(causal_lm)
        elif share_context and not shares_context(causal_lm):
            raise ValueError(
                "`share_context=True` needs a Llama-family backbone "
                "(`keras_hub.models.LlamaBackbone`). Pass "
                "share_context='auto' or False for this model. Received: "
                f"share_context={share_context!r} for a "
                f"{type(causal_lm.backbone).__name__}"
            )
        self.shares_context = bool(share_context)
        self._keras = keras
        self._sequence_model = position_logits_model(causal_lm)
        self._context_models = {}
        if self.shares_context:
            # One model per input structure (with and without continuation
            # rows): each compiles its own function.
            self._context_models = {
                rows: _context_model(causal_lm, rows) for rows in (False, True)
            }
        if jit_compile != "auto":
            for model in (self._sequence_model, *self._context_models.values()):
                model.jit_compile = bool(jit_compile)
        # Whether each new input shape costs a compilation: always on
        # TensorFlow (a traced function per shape) and JAX, on torch only
        # with `jit_compile`. Scorers pad to few shapes only if so.
        self.fixed_shapes = (
            keras.config.backend() != "torch"
            or self._sequence_model.jit_compile
        )

    def __call__(self, token_ids, padding_mask, positions):
        """`(batch, positions, vocabulary)` float32 logits.

        Args:
            token_ids: `(batch, length)` int, padded on the right.
            padding_mask: `(batch, length)`, 1 on the tokens.
            positions: `(batch, positions)` int, where to read the logits.
        """
        out = self._sequence_model.predict_on_batch(
            {
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "positions": positions,
            }
        )
        return self._numpy(out)

    def context_logits(
        self, context_ids, context_mask, row_ids, row_context, row_targets
    ):
        """Each context once, then continuation rows from its cache.

        Args:
            context_ids: `(contexts, length)` int, padded on the left.
            context_mask: `(contexts, length)`, 1 on the tokens.
            row_ids: `(rows, row_length)` int: each row's continuation
                tokens after its context (padded on the right), or `None`
                (or 0 rows) when only the contexts are run.
            row_context: `(rows,)` int, the context of each row.
            row_targets: `(rows, row_length)` int, the token whose
                log-probability is read after each row token (any valid
                id on padding).

        Returns:
            A tuple `(last, rows)` of float32 numpy log-probabilities:
            `last` `(contexts, vocabulary)`, of every token after each
            context's last token, and `rows` `(rows, row_length)`, of
            `row_targets` after each row token (`None` without rows).
        """
        if not self.shares_context:
            raise ValueError(
                "This `KerasLogits` was built with share_context=False; "
                "build it with share_context='auto' for a Llama-family "
                "model."
            )
        inputs = {"context_ids": context_ids, "context_mask": context_mask}
        with_rows = row_ids is not None and len(row_ids) > 0
        if with_rows:
            inputs.update(
                row_ids=row_ids,
                row_context=row_context,
                row_targets=row_targets,
            )
        out = self._context_models[with_rows].predict_on_batch(inputs)
        if with_rows:
            return self._numpy(out["last"]), self._numpy(out["rows"])
        return self._numpy(out["last"]), None

    def _numpy(self, x):
        return np.asarray(self._keras.ops.convert_to_numpy(x), "float32")


def position_logits_model(causal_lm):
    """A model over `causal_lm`'s layers with logits only at `positions`.

    `{"token_ids", "padding_mask", "positions"}` -> `(batch, positions,
    vocabulary)` float32 logits: the backbone runs on the whole sequence,
    and the vocabulary projection (the tied or separate head) only on the
    hidden states at `positions`. The weights are the `CausalLM`'s.

    Fit it instead of the `CausalLM` when the loss reads few positions
    (the answer tokens, `weighted_positions`): the projection onto the
    vocabulary and the loss then run on those positions only. Its
    `backbone` is the `CausalLM`'s, so `keras_relora.get_state` and a
    `keras_relora.ReducerCallback` (given `probe_data`) find the adapters
    of an adapted `CausalLM`.
    """
    import keras

    class PositionLogits(keras.Model):
        def __init__(self):
            super().__init__()
            self.backbone = causal_lm.backbone
            # No weights of its own: built. Otherwise JAX's `predict` and
            # `predict_on_batch` first run an unbuilt model eagerly, op by
            # op, compiling each op for each new shape.
            self.built = True

        def call(self, inputs):
            hidden = self.backbone(
                {
                    "token_ids": inputs["token_ids"],
                    "padding_mask": inputs["padding_mask"],
                }
            )  # (batch, length, hidden)
            hidden = keras.ops.take_along_axis(
                hidden, inputs["positions"][:, :, None], axis=1
            )  # (batch, positions, hidden)
            logits = self.backbone.token_embedding(hidden, reverse=True)
            return keras.ops.cast(logits, "float32")

    return PositionLogits()


def weighted_positions(y, sample_weight, width=None):
    """Per-token training arrays cut to the positions with a weight.

    Args:
        y: `(rows, length)` int targets (the next token at each position).
        sample_weight: `(rows, length)` loss weights, 0 where the loss
            does not read (the prompt, the padding).
        width: int or `None`. Positions kept per row; defaults to the most
            weighted positions of any row. A row with more raises.

    Returns:
        A tuple `(positions, y, sample_weight)` of `(rows, width)` arrays:
        each row's weighted positions in order, then position 0 with
        target 0 and weight 0. With `position_logits_model`, the weighted
        sum of the loss is the same as on the full arrays.
    """
    y, sample_weight = np.asarray(y), np.asarray(sample_weight)
    if y.shape != sample_weight.shape or y.ndim != 2:
        raise ValueError(
            "`y` and `sample_weight` must both be `(rows, length)`. "
            f"Received: y.shape={y.shape}, "
            f"sample_weight.shape={sample_weight.shape}"
        )
    counts = (sample_weight != 0).sum(axis=1)
    most = int(counts.max()) if len(counts) else 0
    width = max(most, 1) if width is None else int(width)
    if most > width:
        raise ValueError(
            f"A row has {most} weighted positions, more than `width`="
            f"{width}. Pass width >= {most} or width=None."
        )
    rows = len(y)
    positions = np.zeros((rows, width), "int32")
    targets = np.zeros((rows, width), y.dtype)
    weights = np.zeros((rows, width), sample_weight.dtype)
    for i in range(rows):
        (at,) = np.nonzero(sample_weight[i])
        positions[i, : len(at)] = at
        targets[i, : len(at)] = y[i, at]
        weights[i, : len(at)] = sample_weight[i, at]
    return positions, targets, weights


def _context_model(causal_lm, with_rows):
    import keras
    from keras import ops

    backbone = causal_lm.backbone
    heads = backbone.num_key_value_heads
    head_dim = backbone.hidden_dim // backbone.num_query_heads

    def project(hidden):
        logits = backbone.token_embedding(
            backbone.layer_norm(hidden), reverse=True
        )
        return ops.cast(logits, "float32")

    class ContextLogits(keras.Model):
        def __init__(self):
            super().__init__()
            self.causal_lm = causal_lm
            self.built = True  # No weights of its own (PositionLogits).

        def call(self, inputs):
            context = inputs["context_ids"]  # (contexts, length)
            real = ops.cast(inputs["context_mask"], "int32")
            contexts, length = ops.shape(context)[0], ops.shape(context)[1]
            x = backbone.token_embedding(context)
            # A context token sees the context's tokens; a padding token
            # sees the padding before it (a row with nothing to attend to
            # would be undefined).
            context_mask = ops.maximum(real[:, None, :], 1 - real[:, :, None])
            if with_rows:
                rows = inputs["row_ids"]  # (rows, row_length)
                owner = ops.cast(inputs["row_context"], "int32")
                num_rows, row_length = ops.shape(rows)[0], ops.shape(rows)[1]
                y = backbone.token_embedding(rows)
                # A row token sees its context's tokens and (causally,
                # added by the block) the row's own tokens.
                keys = ops.concatenate(
                    [
                        ops.take(real, owner, axis=0),
                        ops.ones((num_rows, row_length), "int32"),
                    ],
                    axis=1,
                )
                row_mask = ops.broadcast_to(
                    keys[:, None, :],
                    (num_rows, row_length, length + row_length),
                )
            for block in backbone.transformer_layers:
                cache = ops.zeros(
                    (contexts, 2, length, heads, head_dim),
                    dtype=backbone.compute_dtype,
                )
                x, cache = block(
                    x,
                    decoder_attention_mask=context_mask,
                    self_attention_cache=cache,
                    self_attention_cache_update_index=0,
                )
                if with_rows:
                    cache = ops.pad(
                        ops.take(cache, owner, axis=0),
                        [[0, 0], [0, 0], [0, row_length], [0, 0], [0, 0]],
                    )
                    y, _ = block(
                        y,
                        decoder_attention_mask=row_mask,
                        self_attention_cache=cache,
                        self_attention_cache_update_index=length,
                    )
            out = {"last": ops.log_softmax(project(x[:, -1, :]), axis=-1)}
            if with_rows:
                logits = project(y)  # (rows, row_length, vocabulary)
                targets = ops.cast(inputs["row_targets"], "int32")
                read = ops.take_along_axis(logits, targets[..., None], axis=-1)
                out["rows"] = read[..., 0] - ops.logsumexp(logits, axis=-1)
            return out

    return ContextLogits()
