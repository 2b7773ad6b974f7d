import keras
from keras import ops

from keras_relora._checks import int_arg


@keras.saving.register_keras_serializable(package="keras_relora")
class SharedLoraA(keras.layers.Layer):
    """The LoRA down-projection `A`, shared by many adapted layers.

    ReLoRA uses one `A` for every transformer block (Less is more:
    resource-efficient low-rank adaptation, §3.1): each `ReloraDense` that
    receives the same `SharedLoraA` reads the same variable, so it is stored
    and trained once.

    `y = x @ kernel`, with `kernel` of shape `(input_dim, rank)`, float32
    whatever the dtype policy (as Keras's own LoRA weights), cast to the
    compute dtype in `call`.

    Args:
        input_dim: int. Size of the last axis of the inputs.
        rank: int. The rank of the adapter.
        kernel_initializer: Initializer for `kernel`. Defaults to
            `"he_uniform"`, as Keras's `Dense.enable_lora`.
        trainable: bool. Whether `kernel` trains. `False` gives LoRA-FA.
            Defaults to `True`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Input shape:
        N-D tensor with shape `(..., input_dim)`.

    Output shape:
        N-D tensor with shape `(..., rank)`.

    Example:

    >>> a = keras_relora.SharedLoraA(input_dim=16, rank=4)
    >>> a(np.ones((2, 16))).shape
    (2, 4)
    """

    def __init__(
        self,
        input_dim,
        rank,
        *,
        kernel_initializer="he_uniform",
        trainable=True,
        **kwargs,
    ):
        super().__init__(trainable=trainable, **kwargs)
        input_dim = int_arg("input_dim", input_dim, 1, "a positive int")
        rank = int_arg("rank", rank, 1, "a positive int, e.g. `rank=16`")
        self.input_dim = input_dim
        self.rank = rank
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.build()

    def build(self, input_shape=None):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.input_dim, self.rank),
            initializer=self.kernel_initializer,
            dtype="float32",
        )
        self.built = True

    def call(self, inputs):
        return ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.rank,)

    def get_config(self):
        config = {
            "input_dim": self.input_dim,
            "rank": self.rank,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
        }
        return {**super().get_config(), **config}
