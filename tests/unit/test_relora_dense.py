"""ReloraDense and SharedLoraA against an independent numpy reference.

The reference runs the layer's own einsum equation on a full kernel-shaped
delta per expert (`A @ B_i` folded back into the kernel layout by hand),
loops over experts and computes the gates with numpy, so it shares no code
path with the layer's single-matmul implementation.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_relora

RANK = 3


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def to_np(x):
    return ops.convert_to_numpy(x).astype("float64")


# equation, input shape, output_shape arg, contracted letters, free letters
EINSUM_CASES = [
    ("bqm,muh->bquh", (2, 3, 8), (None, 2, 4), "m", "uh"),
    ("bquh,uhm->bqm", (2, 3, 2, 4), (None, 8), "uh", "m"),
    ("btd,ndh->btnh", (2, 3, 8), (None, 2, 4), "d", "nh"),
    ("abcd,cde->abe", (2, 3, 2, 4), (None, 8), "cd", "e"),
]


def make_einsum(equation, input_shape, output_shape):
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=None)
    layer.build(input_shape)
    return layer


def reference(layer, adapter, x, contracted, free):
    """Output of the adapted layer, computed the slow, obvious way."""
    x = np.asarray(x, "float64")
    a = to_np(adapter.shared_a.kernel)
    b = to_np(adapter.b_kernel)  # (experts, rank, d_out)
    scale = adapter.alpha / adapter.rank
    if isinstance(layer, keras.layers.Dense):
        equation, kernel_spec = "...a,ab->...b", "ab"
        contracted, free = "a", "b"
    else:
        equation = layer.equation
        kernel_spec = equation.split(",")[1].split("->")[0]
        input_spec = equation.split(",")[0]
    base = np.einsum(equation, x, to_np(layer.kernel))
    kernel_shape = tuple(layer.kernel.shape)
    sizes = dict(zip(kernel_spec, kernel_shape, strict=False))
    block_shape = [sizes[c] for c in contracted + free]
    # Back from (contracted..., free...) to the kernel's own axis order.
    perm = [(contracted + free).index(c) for c in kernel_spec]

    def folded(matrix):  # (d_in, d_out) -> kernel layout
        return np.transpose(matrix.reshape(block_shape), perm)

    # h = x @ A over the contracted axes, via the layer's equation with a
    # kernel whose free part is the rank.
    if isinstance(layer, keras.layers.Dense):
        h = x @ a
    else:
        batch = "".join(c for c in input_spec if c not in kernel_spec)
        h = np.einsum(
            f"{input_spec},{contracted}z->{batch}z",
            x,
            a.reshape([sizes[c] for c in contracted] + [RANK]),
        )
    if adapter.experts == 1:
        gates = np.ones(h.shape[:-1] + (1,))
    else:
        router = to_np(adapter.router_kernel)
        if adapter.router_input == "projected":
            logits = h @ router
        else:
            logits = np.einsum(
                f"{input_spec},{contracted}z->{batch}z"
                if not isinstance(layer, keras.layers.Dense)
                else "...a,az->...z",
                x,
                router.reshape([sizes[c] for c in contracted] + [-1])
                if not isinstance(layer, keras.layers.Dense)
                else router,
            )
        gates = np_softmax(logits)
        if adapter.top_k:
            cut = np.sort(gates, -1)[..., -adapter.top_k][..., None]
            gates = np.where(gates >= cut, gates, 0.0)
            gates = gates / gates.sum(-1, keepdims=True)
    delta = np.zeros_like(base)
    for i in range(adapter.experts):
        per_expert = np.einsum(equation, x, folded(a @ b[i]))
        g = gates[..., i].reshape(
            gates.shape[:-1] + (1,) * (base.ndim - gates.ndim + 1)
        )
        delta += scale * g * per_expert
    return base + delta


def randomize(adapter, seed=1):
    rng = np.random.default_rng(seed)
    adapter.b_kernel.assign(
        rng.normal(size=adapter.b_kernel.shape).astype("float32")
    )
    if adapter.router_kernel is not None:
        adapter.router_kernel.assign(
            rng.normal(size=adapter.router_kernel.shape).astype("float32")
        )


@pytest.mark.parametrize(
    "equation,in_shape,out_arg,contracted,free", EINSUM_CASES
)
@pytest.mark.parametrize(
    "options",
    [
        dict(experts=1),
        dict(experts=4),
        dict(experts=4, top_k=2),
        dict(experts=3, router_input="input", alpha=6.0),
    ],
)
def test_einsum_matches_reference(
    equation, in_shape, out_arg, contracted, free, options
):
    layer = make_einsum(equation, in_shape, out_arg)
    d_in = int(
        np.prod(
            [
                layer.kernel.shape[
                    equation.split(",")[1].split("->")[0].index(c)
                ]
                for c in contracted
            ]
        )
    )
    a = keras_relora.SharedLoraA(d_in, RANK)
    adapter = keras_relora.ReloraDense(layer, a, **options)
    randomize(adapter)
    x = np.random.default_rng(0).normal(size=in_shape).astype("float32")
    got = to_np(adapter(x))
    want = reference(layer, adapter, x, contracted, free)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_dense_matches_reference_before_activation(activation):
    layer = keras.layers.Dense(5, activation=activation)
    layer.build((None, 7))
    a = keras_relora.SharedLoraA(7, RANK)
    adapter = keras_relora.ReloraDense(layer, a, experts=2)
    randomize(adapter)
    x = np.random.default_rng(0).normal(size=(4, 7)).astype("float32")
    want = reference(layer, adapter, x, "a", "b") + to_np(layer.bias)
    if activation == "relu":
        want = np.maximum(want, 0.0)
    np.testing.assert_allclose(to_np(adapter(x)), want, rtol=1e-4, atol=1e-4)
    # The wrapped layer's own activation is untouched after the call.
    assert (layer.activation is keras.activations.relu) == (
        activation == "relu"
    )


def test_zero_init_output_equals_base_bitwise():
    layer = make_einsum("btd,ndh->btnh", (2, 3, 8), (None, 2, 4))
    adapter = keras_relora.ReloraDense(
        layer, keras_relora.SharedLoraA(8, RANK), experts=4
    )
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(adapter(x)), ops.convert_to_numpy(layer(x))
    )


def test_variables_shapes_and_dtypes_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = keras.layers.Dense(6)
    layer.build((None, 5))
    adapter = keras_relora.ReloraDense(
        layer, keras_relora.SharedLoraA(5, RANK), experts=4
    )
    assert tuple(adapter.b_kernel.shape) == (4, RANK, 6)
    assert tuple(adapter.router_kernel.shape) == (RANK, 4)
    assert tuple(adapter.shared_a.kernel.shape) == (5, RANK)
    for v in (adapter.b_kernel, adapter.router_kernel, adapter.shared_a.kernel):
        assert v.dtype == "float32"
    y = adapter(np.ones((2, 5), "float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


def test_router_input_shapes_and_no_router_for_one_expert():
    layer = keras.layers.Dense(6)
    layer.build((None, 5))
    a = keras_relora.SharedLoraA(5, RANK)
    hydra = keras_relora.ReloraDense(layer, a, experts=3, router_input="input")
    assert tuple(hydra.router_kernel.shape) == (5, 3)
    single = keras_relora.ReloraDense(layer, a, experts=1)
    assert single.router_kernel is None
    # The wrapped layer is frozen: only B and A train.
    assert sorted(v.path for v in single.trainable_weights) == sorted(
        [single.b_kernel.path, a.kernel.path]
    )


def test_dropout_only_in_training():
    layer = keras.layers.Dense(6)
    layer.build((None, 5))
    a = keras_relora.SharedLoraA(5, RANK)
    adapter = keras_relora.ReloraDense(layer, a, experts=2, dropout=0.5)
    twin = keras_relora.ReloraDense(layer, a, experts=2)
    randomize(adapter)
    twin.b_kernel.assign(adapter.b_kernel)
    twin.router_kernel.assign(adapter.router_kernel)
    x = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    np.testing.assert_allclose(
        to_np(adapter(x, training=False)), to_np(twin(x)), rtol=1e-6
    )
    assert (
        np.abs(to_np(adapter(x, training=True)) - to_np(twin(x))).max() > 1e-3
    )


def test_balance_loss_is_switch_transformer_formula():
    layer = keras.layers.Dense(6)
    layer.build((None, 5))
    a = keras_relora.SharedLoraA(5, RANK)
    adapter = keras_relora.ReloraDense(layer, a, experts=3, balance_loss=0.1)
    randomize(adapter)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    adapter(x, training=False)
    assert len(adapter.losses) == 0
    adapter(x, training=True)
    (loss,) = adapter.losses
    gates = np_softmax((x @ to_np(a.kernel)) @ to_np(adapter.router_kernel))
    f = np.bincount(gates.argmax(-1), minlength=3) / len(x)
    want = 0.1 * 3 * np.sum(f * gates.mean(0))
    np.testing.assert_allclose(float(to_np(loss)), want, rtol=1e-5)


def test_functional_keras_round_trip_keeps_a_shared(tmp_path):
    a = keras_relora.SharedLoraA(6, RANK)
    first = keras.layers.Dense(6)
    first.build((None, 6))
    second = keras.layers.Dense(2)
    second.build((None, 6))
    inputs = keras.Input((6,))
    outputs = keras_relora.ReloraDense(second, a, experts=2)(
        keras_relora.ReloraDense(first, a, experts=2)(inputs)
    )
    model = keras.Model(inputs, outputs)
    for layer in model.layers[1:]:
        randomize(layer)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model(x)), ops.convert_to_numpy(loaded(x))
    )
    l1, l2 = loaded.layers[1:]
    assert l1.shared_a is l2.shared_a
    assert sum(v is l1.shared_a.kernel for v in loaded.weights) == 1
    assert len(loaded.weights) == len(model.weights)


def test_get_config_round_trip():
    layer = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4))
    layer.build((None, 3, 8))
    adapter = keras_relora.ReloraDense(
        layer,
        keras_relora.SharedLoraA(8, RANK),
        experts=3,
        top_k=2,
        alpha=4.0,
        dropout=0.1,
        router_input="input",
        block=2,
    )
    clone = keras_relora.ReloraDense.from_config(adapter.get_config())
    for key in (
        "experts",
        "top_k",
        "alpha",
        "dropout",
        "router_input",
        "block",
        "rank",
    ):
        assert getattr(clone, key) == getattr(adapter, key)
    assert clone._base_layer.equation == "abc,cde->abde"


def test_fit_trains_only_adapter_variables():
    layer = keras.layers.Dense(3)
    layer.build((None, 5))
    inputs = keras.Input((5,))
    adapter = keras_relora.ReloraDense(
        layer, keras_relora.SharedLoraA(5, RANK), experts=2
    )
    model = keras.Model(inputs, adapter(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    frozen = [to_np(layer.kernel), to_np(layer.bias)]
    b0 = to_np(adapter.b_kernel)
    rng = np.random.default_rng(0)
    model.fit(
        rng.normal(size=(16, 5)), rng.normal(size=(16, 3)), epochs=2, verbose=0
    )
    np.testing.assert_array_equal(to_np(layer.kernel), frozen[0])
    np.testing.assert_array_equal(to_np(layer.bias), frozen[1])
    assert np.abs(to_np(adapter.b_kernel) - b0).max() > 0


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(experts=0), ValueError, "Received: experts=0"),
        (dict(router_input="x"), ValueError, "Received: router_input='x'"),
        (dict(top_k=5), ValueError, "Received: top_k=5"),
        (dict(dropout=1.0), ValueError, "Received: dropout=1.0"),
        (dict(balance_loss=-1.0), ValueError, "balance_loss=-1.0"),
        (dict(alpha=0), ValueError, "Received: alpha=0"),
        (dict(block=-1), ValueError, "Received: block=-1"),
    ],
)
def test_argument_errors(kwargs, error, message):
    layer = keras.layers.Dense(3)
    layer.build((None, 5))
    with pytest.raises(error, match=message):
        keras_relora.ReloraDense(
            layer, keras_relora.SharedLoraA(5, RANK), **kwargs
        )


def test_layer_and_shared_a_errors():
    with pytest.raises(TypeError, match="must be a `keras.layers.Dense`"):
        keras_relora.ReloraDense(
            keras.layers.Conv1D(2, 1), keras_relora.SharedLoraA(5, RANK)
        )
    layer = keras.layers.Dense(3)
    layer.build((None, 5))
    with pytest.raises(TypeError, match="SharedLoraA"):
        keras_relora.ReloraDense(layer, "a")
    with pytest.raises(ValueError, match="does not match d_in=5"):
        keras_relora.ReloraDense(layer, keras_relora.SharedLoraA(4, RANK))
    with pytest.raises(ValueError, match="Received: rank=0"):
        keras_relora.SharedLoraA(5, 0)
    with pytest.raises(ValueError, match="Received: input_dim=-1"):
        keras_relora.SharedLoraA(-1, 2)


def test_shared_lora_a_call_and_config():
    a = keras_relora.SharedLoraA(4, 2, kernel_initializer="ones")
    np.testing.assert_allclose(
        to_np(a(np.ones((3, 4), "float32"))), np.full((3, 2), 4.0)
    )
    clone = keras_relora.SharedLoraA.from_config(a.get_config())
    assert (clone.input_dim, clone.rank) == (4, 2)
    assert a.kernel.dtype == "float32"
