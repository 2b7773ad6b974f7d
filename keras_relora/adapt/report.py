"""`ReloraReport` and `report`: what `enable_relora` and `budget` return."""

import math

from keras_relora import _keras_internals
from keras_relora.adapt.state import require_state

# Variables that Keras's `quantize` adds beside a weight (scales, zero
# points, group indices, amax histories): how to read the weight, not
# parameters of the model.
QUANTIZATION_SUFFIXES = ("_scale", "_zero", "_amax_history")


def _is_quantization_variable(name):
    return name == "g_idx" or name.endswith(QUANTIZATION_SUFFIXES)


def count_params(variables):
    """The number of scalars in `variables` (an iterable of variables)."""
    return sum(math.prod(int(d) for d in v.shape) for v in variables)


def count_base_params(model, variables):
    """Parameters of `model` held by `variables`, as its float model has them.

    A layer quantized by Keras (`model.quantize(mode)`) counts its weight
    as the float weight it stands for: an int4 weight packs two values in
    a byte (so its stored shape is about half), and the scales, zero
    points and amax histories that quantizing adds are not parameters.
    Other variables count their scalars, as `count_params`.
    """
    quantized = {
        layer.path: layer
        for layer in _keras_internals.flatten_layers(model)
        if getattr(layer, "quantization_mode", None)
    }
    total = 0
    for variable in variables:
        owner, _, name = variable.path.rpartition("/")
        layer = quantized.get(owner)
        if layer is None:
            total += count_params([variable])
        elif _is_quantization_variable(name):
            continue
        elif layer.quantization_mode == "int4":
            total += math.prod(_int4_float_shape(layer, name, variable))
        else:
            total += count_params([variable])
    return total


def _int4_float_shape(layer, name, variable):
    """The float shape of a weight that int4 quantizing packed."""
    if name == "kernel":
        shape = getattr(layer, "original_kernel_shape", None)  # EinsumDense
        if shape is not None:
            return tuple(int(d) for d in shape)
        if hasattr(layer, "units"):  # Dense: packed along the last axis.
            return (int(variable.shape[0]), int(layer.units))
    if name == "embeddings" and hasattr(layer, "input_dim"):
        return (int(layer.input_dim), int(layer.output_dim))
    if name == "reverse_embeddings" and hasattr(layer, "input_dim"):
        return (int(layer.output_dim), int(layer.input_dim))
    # A layer this function does not know: two values per stored byte.
    return (2 * count_params([variable]),)


def report(model, base_params=None):
    """The `ReloraReport` of an adapted model."""
    state = require_state(model, "`report`")
    return ReloraReport.from_model(model, state, base_params=base_params)


class ReloraReport:
    """Parameter counts of an adapted model, per role and per kind.

    Attributes:
        trainable_params: int. Parameters the optimizer updates.
        total_params: int. All parameters, base and adapters (counted as
            `base_params` is).
        base_params: int. Parameters of the model before adaptation (a
            quantized layer's weight counted as its float weight, its
            scales left out: `count_base_params`).
        adapter_params: int. Parameters `enable_relora` added.
        trainable_percent: float. `100 * trainable_params / base_params`,
            the figure the LoRA papers report.
        roles: dict. Role -> dict with `layers`, `a`, `b`, `router`
            (parameter counts; a shared A counted once).
        settings: dict. The `enable_relora` settings.
        num_blocks: int. Blocks the adapters sit in.
    """

    def __init__(
        self,
        *,
        trainable_params,
        total_params,
        base_params,
        roles,
        settings,
        num_blocks,
    ):
        self.trainable_params = trainable_params
        self.total_params = total_params
        self.base_params = base_params
        self.adapter_params = total_params - base_params
        self.trainable_percent = 100.0 * trainable_params / max(base_params, 1)
        self.roles = roles
        self.settings = settings
        self.num_blocks = num_blocks

    @classmethod
    def from_model(cls, model, state, base_params=None):
        roles = {}
        seen = set()
        adapter_params = 0
        for adapter in state.adapters.values():
            row = roles.setdefault(
                adapter.role, {"layers": 0, "a": 0, "b": 0, "router": 0}
            )
            row["layers"] += 1
            kernel = adapter.shared_a.kernel
            if id(kernel) not in seen:
                seen.add(id(kernel))
                row["a"] += count_params([kernel])
            for kind, variable in (
                ("b", adapter.b_kernel),
                ("router", adapter.router_kernel),
            ):
                if variable is not None:
                    row[kind] += count_params([variable])
        for row in roles.values():
            adapter_params += row["a"] + row["b"] + row["router"]
        total = count_base_params(model, model.weights)
        if base_params is None:
            # Only adapter weights (and the non-trainable suppression
            # scalars) were added by enable_relora.
            base_params = total - adapter_params - len(state.adapters)
        return cls(
            trainable_params=count_params(model.trainable_weights),
            total_params=total,
            base_params=base_params,
            roles=roles,
            settings=dict(state.settings),
            num_blocks=state.num_blocks,
        )

    def as_dict(self):
        return {
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "base_params": self.base_params,
            "adapter_params": self.adapter_params,
            "trainable_percent": self.trainable_percent,
            "roles": self.roles,
            "num_blocks": self.num_blocks,
        }

    def __str__(self):
        s = self.settings
        head = (
            f"ReLoRA rank={s['rank']} experts={s['experts']} "
            f"share_a={s['share_a']!r} train_a={s['train_a']}: "
            f"{sum(r['layers'] for r in self.roles.values())} layers in "
            f"{self.num_blocks} blocks"
        )
        lines = [
            head,
            f"{'role':<8}{'layers':>8}{'A':>14}{'B':>14}"
            f"{'router':>12}{'total':>14}",
        ]
        for role, r in self.roles.items():
            total = r["a"] + r["b"] + r["router"]
            lines.append(
                f"{role:<8}{r['layers']:>8}{r['a']:>14,}{r['b']:>14,}"
                f"{r['router']:>12,}{total:>14,}"
            )
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: "
            f"{self.total_params:,} || trainable%: "
            f"{self.trainable_percent:.4f} (of {self.base_params:,} base)"
        )
        return "\n".join(lines)

    __repr__ = __str__
