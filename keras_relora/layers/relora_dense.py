import keras
from keras import ops

from keras_relora import _keras_internals
from keras_relora._checks import adapter_args
from keras_relora._checks import int_arg
from keras_relora.layers.einsum_axes import EinsumAxes
from keras_relora.layers.shared_lora_a import SharedLoraA


def linear_call(layer, fn, *args, **kwargs):
    """Runs `fn` (the layer's call) with the layer's activation switched off.

    The adapter's delta is added before the activation, as Keras's own LoRA
    does by adding `A @ B` to the kernel.
    """
    activation = layer.activation
    if activation in (None, keras.activations.linear):
        return fn(*args, **kwargs)
    layer.activation = keras.activations.linear
    try:
        return fn(*args, **kwargs)
    finally:
        layer.activation = activation


def adapter_dtype(layer):
    """The dtype policy of an adapter of `layer`: its float part.

    A quantized layer's policy (e.g. int8) would send the adapter's own
    call through Keras's quantized path; the adapter computes in the
    layer's compute dtype and keeps its weights in float32.
    """
    policy = layer.dtype_policy
    if policy.quantization_mode is None:
        return policy
    return keras.DTypePolicy(policy.compute_dtype)


def _matmul_path(axes):
    """Whether the adapter's two einsums are plain matmuls, on torch.

    True when the input's last axis is the only one contracted and the
    output is the input's other axes followed by the kernel's free axes
    (a `Dense`, and keras-hub's q/k/v `EinsumDense`s). torch's eager
    `einsum` permutes and copies its operands around a `bmm` (184 -> 247
    aten ops per adapter, `benchmarks/RESULTS.md`); a matmul on the last
    axis runs as one `mm`. JAX and TensorFlow compile the einsums to the
    same dot as a matmul, so they keep them.
    """
    if keras.config.backend() != "torch":
        return False
    inputs, rest = axes.project_equation.split(",")
    kernel, outputs = rest.split("->")
    batch, contracted = outputs[:-1], kernel[:-1]
    if len(contracted) != 1 or inputs != batch + contracted:
        return False
    _, rest = axes.expand_equation.split(",")
    kernel, outputs = rest.split("->")
    return outputs == batch + kernel[2:]


@keras.saving.register_keras_serializable(package="keras_relora")
class ReloraDense(keras.layers.Layer):
    """A frozen `Dense`/`EinsumDense` plus a routed mixture of LoRA experts.

    For a target layer with frozen kernel `W` (`d_in -> d_out`):

    ```
    h     = dropout(x) @ A                        # (..., rank), A shared
    gates = softmax(h @ router_kernel)            # (..., experts)
    delta = (alpha / rank) * sum_i gates_i * (h @ B_i)
    y     = activation(x @ W + bias + delta)
    ```

    This is the adapted linear layer of ReLoRA ("Less is more:
    resource-efficient low-rank adaptation", §3.1): `A` is shared across
    blocks (pass the same `SharedLoraA` to several layers), every layer has
    its own experts `B_i` and router. The experts run as one matmul over the
    concatenated `gates_i * h` (inner size `experts * rank`), never a loop.

    Initialisation: every `B_i` is zero, so the adapted layer's output equals
    the base layer's at step 0; the router is `RandomNormal(stddev=0.02)`.
    Adapter variables are float32; the math runs in the compute dtype.

    For an `EinsumDense`, `d_in` is the product of the kernel axes contracted
    with the input and `d_out` the product of the kernel's free axes; the
    adapter works in activation space and never forms `W + A @ B`.

    Args:
        layer: A `keras.layers.Dense` or `keras.layers.EinsumDense`. Its
            weights are frozen (`trainable=False`) when this layer builds.
        shared_a: A `keras_relora.SharedLoraA` with `input_dim == d_in`.
        experts: int. Number of `B` experts. `1` drops the router (the gate
            is 1, plain LoRA `B`). Defaults to `4`.
        alpha: float. Scale numerator: the delta is scaled by
            `alpha / rank`. Defaults to `rank`.
        dropout: float. Dropout rate on the adapter's input, in training
            only. Defaults to `0.0`.
        router_input: `"projected"` routes on `h = x @ A` (the paper's
            `W_g`, shape `(rank, experts)`); `"input"` routes on `x`
            (HydraLoRA, shape `(d_in, experts)`). Defaults to `"projected"`.
        top_k: int or None. Keep the `top_k` largest gates, renormalised to
            sum to 1. `None` keeps the dense softmax. Defaults to `None`.
        balance_loss: float. Coefficient `c` of the Switch Transformer
            load-balancing loss (Fedus et al. 2022, eq. 4),
            `c * experts * sum_i f_i * P_i`, with `f_i` the fraction of
            tokens whose largest gate is expert `i` and `P_i` the mean gate
            of expert `i`. Added with `add_loss` in training. Defaults to
            `0.0` (off).
        role: str or None. The role of `layer` in its model (`"q"`,
            `"up"`, ...), which groups adapters in reports and in
            `share_a="role"`. `enable_relora` sets it. Defaults to `None`.
        block: int or None. The transformer block the layer belongs to,
            used by `ReducerCallback`. Defaults to `None`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Input shape:
        The input shape of `layer`.

    Output shape:
        The output shape of `layer`.

    Example:

    >>> dense = keras.layers.Dense(8)
    >>> dense.build((None, 16))
    >>> a = keras_relora.SharedLoraA(input_dim=16, rank=4)
    >>> adapted = keras_relora.ReloraDense(dense, a, experts=2)
    >>> adapted(np.ones((3, 16))).shape
    (3, 8)
    """

    def __init__(
        self,
        layer,
        shared_a,
        *,
        experts=4,
        alpha=None,
        dropout=0.0,
        router_input="projected",
        top_k=None,
        balance_loss=0.0,
        role=None,
        block=None,
        pruned=False,
        **kwargs,
    ):
        injected = kwargs.pop("_injected", False)
        if not isinstance(
            layer, (keras.layers.Dense, keras.layers.EinsumDense)
        ):
            raise TypeError(
                "`layer` must be a `keras.layers.Dense` or "
                "`keras.layers.EinsumDense`. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        if not isinstance(shared_a, SharedLoraA):
            raise TypeError(
                "`shared_a` must be a `keras_relora.SharedLoraA`, e.g. "
                "`SharedLoraA(input_dim, rank)`. "
                f"Received: shared_a={shared_a!r}"
            )
        checked = adapter_args(
            experts, alpha, dropout, router_input, top_k, balance_loss
        )
        if role is not None and not isinstance(role, str):
            raise TypeError(
                "`role` must be None or a str naming the layer's role, e.g. "
                f"`role='q'`. Received: role={role!r}"
            )
        if block is not None:
            block = int_arg("block", block, 0, "None or an int >= 0")
        kwargs.setdefault("dtype", adapter_dtype(layer))
        super().__init__(**kwargs)
        self.experts = checked["experts"]
        self.rank = shared_a.rank
        alpha = checked["alpha"]
        self.alpha = float(alpha if alpha is not None else self.rank)
        self.dropout = checked["dropout"]
        self.router_input = router_input
        self.top_k = checked["top_k"]
        self.balance_loss = checked["balance_loss"]
        self.role = role
        self.block = block
        self.pruned = bool(pruned)
        self.injected = injected
        if injected:
            # The adapter lives inside `layer`: tracking `layer` here would
            # make a cycle in the layer tree.
            _keras_internals.set_untracked(self, "_base_layer", layer)
        else:
            self.layer = layer
            _keras_internals.set_untracked(self, "_base_layer", layer)
        self.shared_a = shared_a
        self.dropout_layer = (
            keras.layers.Dropout(self.dropout) if self.dropout > 0 else None
        )
        if layer.built:
            self.build()

    def __dir__(self):
        # Keras's weight loading walks `dir()` and marks a layer visited
        # only after its children: the back-reference to the base layer
        # (which owns this adapter when injected) would loop forever.
        return [name for name in super().__dir__() if name != "_base_layer"]

    def _freeze_base(self):
        # Not the variables of other adapters the layer holds already
        # (named adapters; `keras_relora.set_adapter`).
        adapters = {
            id(v)
            for sub in _keras_internals.flatten_layers(self._base_layer)
            if isinstance(sub, (ReloraDense, SharedLoraA))
            for v in sub.weights
        }
        for variable in self._base_layer.weights:
            if id(variable) not in adapters:
                variable.trainable = False

    @staticmethod
    def axes_of(layer):
        """The `EinsumAxes` of a built Dense or EinsumDense layer."""
        equation = getattr(layer, "equation", "...a,ab->...b")
        return EinsumAxes(equation, tuple(layer.kernel.shape))

    @staticmethod
    def input_size(layer):
        """`d_in` of a built Dense or EinsumDense layer."""
        return ReloraDense.axes_of(layer).d_in

    def build(self, input_shape=None):
        layer = self._base_layer
        if not layer.built:
            layer.build(input_shape)
        self._freeze_base()
        kernel_shape = tuple(layer.kernel.shape)
        self.axes = self.axes_of(layer)
        if self.shared_a.input_dim != self.axes.d_in:
            raise ValueError(
                f"`shared_a.input_dim`={self.shared_a.input_dim} does not "
                f"match d_in={self.axes.d_in} of layer {layer.name!r} "
                f"(kernel shape {kernel_shape}). Use one SharedLoraA per "
                "input size."
            )
        self.suppression = self.add_weight(
            name="suppression",
            shape=(),
            initializer="ones",
            dtype="float32",
            trainable=False,
        )
        self.b_kernel = None
        self.router_kernel = None
        if not self.pruned:
            self._build_experts()
        self._matmul = _matmul_path(self.axes)
        self.built = True

    def _build_experts(self):
        self.b_kernel = self.add_weight(
            name="b_kernel",
            shape=(self.experts, self.rank, self.axes.d_out),
            initializer="zeros",
            dtype="float32",
        )
        if self.experts > 1:
            rows = (
                self.rank
                if self.router_input == "projected"
                else (self.axes.d_in)
            )
            self.router_kernel = self.add_weight(
                name="router_kernel",
                shape=(rows, self.experts),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
                dtype="float32",
            )

    def prune(self):
        """Removes `b_kernel` and `router_kernel` for good (in place).

        The layer's output becomes the base layer's output. Used by
        `keras_relora.prune`; the model must be compiled again after it.
        """
        for variable in (self.b_kernel, self.router_kernel):
            if variable is not None:
                _keras_internals.untrack_variable(self, variable)
        self.b_kernel = None
        self.router_kernel = None
        self.pruned = True

    def _project(self, x, kernel, width):
        """`x @ kernel` over the contracted axes; kernel is `(d_in, width)`."""
        if self._matmul:
            return ops.matmul(x, kernel)
        kernel = ops.reshape(kernel, self.axes.in_shape + (width,))
        project, _ = self.axes.equations(len(x.shape))
        return ops.einsum(project, x, kernel)

    def gates(self, inputs, h=None):
        """Router weights for `inputs`, shape `(..., experts)`, float32."""
        if self.experts == 1:
            raise ValueError("A layer with `experts=1` has no router.")
        if self.router_input == "projected":
            if h is None:
                a = ops.cast(self.shared_a.kernel, inputs.dtype)
                h = self._project(inputs, a, self.rank)
            logits = ops.matmul(h, ops.cast(self.router_kernel, h.dtype))
        else:
            router = ops.cast(self.router_kernel, inputs.dtype)
            logits = self._project(inputs, router, self.experts)
        gates = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        if self.top_k is not None and self.top_k < self.experts:
            _, index = ops.top_k(gates, self.top_k)
            keep = ops.sum(ops.one_hot(index, self.experts), axis=-2)
            gates = gates * keep
            gates = gates / ops.sum(gates, axis=-1, keepdims=True)
        return gates

    def delta(self, inputs, training=None, loss_weight=None):
        """The adapter's contribution, `(alpha / rank) * sum_i g_i h B_i`.

        `loss_weight` (a scalar tensor) scales the balance loss this call
        adds in training: an adapter whose output is weighted by 0 adds
        none.
        """
        x = inputs
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        dtype = x.dtype
        a = ops.cast(self.shared_a.kernel, dtype)
        h = self._project(x, a, self.rank)  # (..., rank)
        scale = ops.cast(self.suppression * (self.alpha / self.rank), dtype)
        if self.experts == 1:
            mixed = ops.expand_dims(h * scale, -2)  # (..., 1, rank)
        else:
            gates = self.gates(x, h)  # (..., experts)
            if training and self.balance_loss > 0:
                loss = self._balance_loss(gates)
                if loss_weight is not None:
                    loss = loss * ops.cast(loss_weight, loss.dtype)
                self.add_loss(loss)
            gates = ops.cast(gates, dtype) * scale
            # (..., experts, rank): concat_i(g_i * h), contracted with B in
            # one einsum over (experts, rank).
            mixed = ops.expand_dims(gates, -1) * ops.expand_dims(h, -2)
        b = ops.cast(self.b_kernel, dtype)
        if self._matmul:
            # (..., experts * rank) @ (experts * rank, d_out).
            inner = self.experts * self.rank
            mixed = ops.reshape(mixed, tuple(mixed.shape[:-2]) + (inner,))
            out = ops.matmul(mixed, ops.reshape(b, (inner, self.axes.d_out)))
            if len(self.axes.out_shape) == 1:
                return out
            return ops.reshape(out, tuple(out.shape[:-1]) + self.axes.out_shape)
        b = ops.reshape(b, (self.experts, self.rank) + self.axes.out_shape)
        _, expand = self.axes.equations(len(x.shape))
        return ops.einsum(expand, mixed, b)

    def _balance_loss(self, gates):
        flat = ops.reshape(gates, (-1, self.experts))
        routed = ops.one_hot(ops.argmax(flat, axis=-1), self.experts)
        fraction = ops.mean(routed, axis=0)  # f_i, no gradient
        probability = ops.mean(flat, axis=0)  # P_i
        return (
            self.balance_loss
            * self.experts
            * ops.sum(ops.stop_gradient(fraction) * probability)
        )

    def call(self, inputs, base_outputs=None, training=None):
        layer = self._base_layer
        if base_outputs is None:
            base_outputs = linear_call(layer, layer, inputs)
        if not self.pruned:
            delta = self.delta(inputs, training=training)
            base_outputs = base_outputs + ops.cast(delta, base_outputs.dtype)
        if layer.activation in (None, keras.activations.linear):
            return base_outputs
        return layer.activation(base_outputs)

    def compute_output_shape(self, inputs_shape, base_outputs_shape=None):
        return self._base_layer.compute_output_shape(inputs_shape)

    def get_config(self):
        # Serialized twice on purpose: inside Keras's object-sharing scope
        # (`.keras` saving) the second call is what marks the config with a
        # `shared_object_id`, so that every ReloraDense that shares this A
        # gets the same object back on load (the first call's dict is copied
        # by the caller before Keras could mark it).
        keras.saving.serialize_keras_object(self.shared_a)
        config = {
            "layer": keras.saving.serialize_keras_object(self._base_layer),
            "shared_a": keras.saving.serialize_keras_object(self.shared_a),
            "experts": self.experts,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "router_input": self.router_input,
            "top_k": self.top_k,
            "balance_loss": self.balance_loss,
            "role": self.role,
            "block": self.block,
            "pruned": self.pruned,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        shared_a = keras.saving.deserialize_keras_object(config.pop("shared_a"))
        return cls(layer, shared_a, **config)
