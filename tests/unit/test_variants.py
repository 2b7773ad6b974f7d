"""`keras_relora.paper_defaults`: the paper's alpha and dropout by name."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_relora


def dense_model():
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(5, name="layer_0")(inputs)
    return keras.Model(inputs, outputs)


def test_paper_defaults_are_the_variant_with_alpha_2r_and_dropout():
    kwargs = keras_relora.paper_defaults(8)
    assert kwargs == {
        **keras_relora.VARIANTS["relora_multi"],
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.05,
    }
    assert keras_relora.paper_defaults(np.int64(4), "relora") == {
        **keras_relora.VARIANTS["relora"],
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.05,
    }
    # A new dict each time: changing it leaves VARIANTS as it was.
    kwargs["experts"] = 99
    assert keras_relora.VARIANTS["relora_multi"]["experts"] == 4


def test_paper_defaults_double_the_adapter_output():
    # alpha = 2 * rank scales the delta by 2 where Keras's alpha = rank
    # scales it by 1: with the same A and B, the delta doubles.
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    deltas = []
    for kwargs in (
        {"rank": 2, **keras_relora.VARIANTS["relora"]},
        keras_relora.paper_defaults(2, "relora"),
    ):
        keras.utils.set_random_seed(0)
        model = dense_model()
        base = ops.convert_to_numpy(model(x))
        model.enable_relora(**kwargs)
        state = keras_relora.get_state(model)
        assert state.settings["dropout"] == kwargs.get("dropout", 0.0)
        (adapter,) = state.adapters.values()
        adapter.b_kernel.assign(
            np.linspace(-1, 1, int(np.prod(adapter.b_kernel.shape)))
            .reshape(tuple(adapter.b_kernel.shape))
            .astype("float32")
        )
        # Inference: dropout is off, so the outputs compare exactly.
        deltas.append(ops.convert_to_numpy(model(x, training=False)) - base)
    assert np.abs(deltas[0]).max() > 1e-2
    np.testing.assert_allclose(deltas[1], 2.0 * deltas[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args, received",
    [
        ((0,), "Received: rank=0"),
        ((2.5,), "Received: rank=2.5"),
        ((True,), "Received: rank=True"),
        ((8, "qlora"), "Received: variant='qlora'"),
    ],
)
def test_paper_defaults_argument_errors(args, received):
    with pytest.raises(ValueError, match=received):
        keras_relora.paper_defaults(*args)
