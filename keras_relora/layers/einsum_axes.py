"""How an `EinsumDense` equation splits its kernel into `d_in` and `d_out`.

An adapter works in activation space: it needs to know which kernel axes
contract with the input (they form `d_in`) and which ones appear in the
output (they form `d_out`). This module reads that off the equation once,
at build time, and returns the two einsum equations the adapter runs.
"""

import math
import re

_EQUATION = re.compile(r"^([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)$")


def _split(spec):
    """Split `"...bq"` into tokens `["...", "b", "q"]`."""
    tokens = []
    i = 0
    while i < len(spec):
        if spec.startswith("...", i):
            tokens.append("...")
            i += 3
        elif spec[i] == ".":
            raise ValueError(f"Malformed ellipsis in `{spec}`.")
        else:
            tokens.append(spec[i])
            i += 1
    return tokens


class EinsumAxes:
    """The `d_in`/`d_out` split of an EinsumDense kernel.

    Args:
        equation: str. The layer's equation, e.g. `"btd,ndh->btnh"`.
        kernel_shape: tuple of int. The shape of the layer's kernel.

    Attributes:
        d_in: int. Product of the kernel axes contracted with the input,
            in the order they appear in the input.
        d_out: int. Product of the kernel's free axes, in the order they
            appear in the output.
        in_shape: tuple. Sizes of the contracted axes (input order).
        out_shape: tuple. Sizes of the free axes (output order).

    The adapter computes `h = einsum(project_equation, x, A)` with `A`
    reshaped to `in_shape + (rank,)` and
    `delta = einsum(expand_equation, g, B)` with `g` of shape
    `(batch..., experts, rank)` and `B` reshaped to
    `(experts, rank) + out_shape`: both experts and rank are contracted in
    one einsum, which the backends lower to a single matmul.

    A `Dense` layer is the equation `"...a,ab->...b"`.

    Call `equations(ndim)` for the pair the layer actually runs: the same
    equations with `...` spelled out as letters for an input of rank
    `ndim`. TensorFlow's einsum gradient keeps every `...` axis of an
    operand when the other operand has none (`_EinsumGrad`), which made the
    adapter's backward pass 3-12x slower than Keras's LoRA there
    (`benchmarks/layer_overhead.py`); explicit letters lower to matmuls.
    """

    def __init__(self, equation, kernel_shape):
        match = _EQUATION.match(equation.replace(" ", ""))
        if match is None:
            raise ValueError(
                "ReloraDense supports EinsumDense equations of the form "
                "`input,kernel->output`. "
                f"Received: equation={equation!r}"
            )
        inp, ker, out = (_split(s) for s in match.groups())
        if len(ker) != len(kernel_shape):
            raise ValueError(
                f"The kernel of equation {equation!r} has {len(ker)} axes "
                f"but the layer's kernel has shape {tuple(kernel_shape)}."
            )
        sizes = dict(zip(ker, kernel_shape, strict=False))
        contracted = [a for a in inp if a in ker and a not in out]
        free = [a for a in out if a in ker and a not in inp]
        shared = [a for a in ker if a in inp and a in out]
        dropped = [a for a in inp if a not in ker and a not in out]
        unused = [a for a in ker if a not in inp and a not in out]
        if shared or dropped or unused or not contracted or not free:
            raise ValueError(
                f"Cannot split equation {equation!r} into a d_in (kernel "
                "axes summed with the input) and a d_out (kernel axes of "
                "the output): ReloraDense needs every kernel axis to be "
                "either contracted with the input or free in the output, "
                "and every other input axis to pass to the output. Exclude "
                "this layer from `targets`. "
                f"Kernel axes in input and output: {shared}; input axes "
                f"summed away: {dropped}; kernel axes used nowhere: {unused}."
            )
        batch = [a for a in inp if a not in ker]
        used = set(equation)
        spare = [c for c in "rmzyxwvutsqponlkjihgfedcba" if c not in used]
        r, m = spare[:2]
        self.equation = equation
        self.in_shape = tuple(sizes[a] for a in contracted)
        self.out_shape = tuple(sizes[a] for a in free)
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)
        b = "".join(batch)
        c, f = "".join(contracted), "".join(free)
        # (batch..., contracted...) x (contracted..., r) -> (batch..., r)
        self.project_equation = f"{''.join(inp)},{c}{r}->{b}{r}"
        # (batch..., m, r) x (m, r, free...) -> output
        self.expand_equation = f"{b}{m}{r},{m}{r}{f}->{''.join(out)}"
        # Kernel axis permutation that brings W to (contracted..., free...),
        # used by merging: W2d = transpose(W, perm).reshape(d_in, d_out).
        self.kernel_to_2d = tuple(ker.index(a) for a in contracted + free)
        self.kernel_shape = tuple(kernel_shape)
        self._input_spec = inp
        self._explicit = {}

    def equations(self, ndim):
        """`(project_equation, expand_equation)` for an input of rank `ndim`.

        Identical to the attributes when the equation has no `...`;
        otherwise `...` is replaced by as many unused letters as the input
        has axes beyond the named ones.
        """
        if "..." not in self._input_spec:
            return self.project_equation, self.expand_equation
        if ndim not in self._explicit:
            named = len(self._input_spec) - 1
            if ndim < named:
                raise ValueError(
                    f"Equation {self.equation!r} needs inputs with at least "
                    f"{named} axes; received an input of rank {ndim}."
                )
            used = set(self.project_equation + self.expand_equation)
            spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
            letters = "".join(spare[: ndim - named])
            self._explicit[ndim] = (
                self.project_equation.replace("...", letters),
                self.expand_equation.replace("...", letters),
            )
        return self._explicit[ndim]
