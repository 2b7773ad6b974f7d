"""Files written by earlier releases still load, exactly.

The fixtures were written by keras_relora at commit 23b333a (the flat
package, before the subpackages) on JAX; see
`tests/fixtures/make_v1_files.py`. Each backend loads them here.
"""

import os

import keras
import numpy as np

import keras_relora

FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"
)


def _expected():
    data = np.load(os.path.join(FIXTURES, "v1_llama_expected.npz"))
    x = {"token_ids": data["token_ids"], "padding_mask": data["padding_mask"]}
    return x, data["outputs"]


def test_v1_keras_file_loads_with_live_adapters():
    x, expected = _expected()
    model = keras.models.load_model(os.path.join(FIXTURES, "v1_llama.keras"))
    state = keras_relora.get_state(model)
    assert state is not None
    assert state.settings["experts"] == 2 and state.settings["rank"] == 2
    assert [a.pruned for a in state.adapters.values()] == [
        a.block == 1 for a in state.adapters.values()
    ]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, atol=2e-5
    )


def test_v1_adapter_file_loads_into_the_base():
    x, expected = _expected()
    model = keras.models.load_model(os.path.join(FIXTURES, "v1_llama.keras"))
    keras_relora.unload(model)  # The base the adapters were saved on.
    assert keras_relora.get_state(model) is None
    assert not np.allclose(
        keras.ops.convert_to_numpy(model(x)), expected, atol=1e-3
    )
    model.load_relora_weights(
        os.path.join(FIXTURES, "v1_llama_adapters.safetensors")
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, atol=2e-5
    )


def test_v1_adapter_file_loads_as_a_named_adapter():
    x, expected = _expected()
    model = keras.models.load_model(os.path.join(FIXTURES, "v1_llama.keras"))
    with_default = keras.ops.convert_to_numpy(model(x))
    keras_relora.set_adapter(model, "default")
    model.load_relora_weights(
        os.path.join(FIXTURES, "v1_llama_adapters.safetensors"),
        adapter_name="again",
    )
    assert keras_relora.adapter_names(model) == ["default", "again"]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x)), with_default
    )
    keras_relora.set_adapter(model, "again")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, atol=2e-5
    )
