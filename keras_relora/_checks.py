"""The argument checks of every public entry point.

Each raises an error that names the argument, says what it must be and
ends with `Received: name=value` (the value's `repr`), and returns the
value normalised (numpy numbers become python ones).
"""

import math
import numbers

import keras

ROUTER_INPUTS = ("projected", "input")


def model_arg(model):
    """Raises a `TypeError` if `model` is not a `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model`. "
            f"Received: model of type {type(model).__name__}"
        )
    return model


def int_arg(name, value, minimum, what, maximum=None):
    """`value` as a python int in `[minimum, maximum]`; numpy integers
    pass, bools do not. Raises a `ValueError` saying it must be `what`."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return int(value)


def float_arg(name, value, what, valid):
    """`value` as a finite python float for which `valid(value)` holds.

    Raises a `TypeError` for a non-number (a str, a bool), a `ValueError`
    for a non-finite or invalid number; both say it must be `what`.
    """
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number:
        raise TypeError(f"`{name}` must be {what}. Received: {name}={value!r}")
    if not math.isfinite(value) or not valid(float(value)):
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return float(value)


def choice_arg(name, value, choices, why=""):
    """`value` if it is one of `choices`; raises a `ValueError` otherwise.

    `why` (a sentence, optional) explains the choices in the message.
    """
    if value not in choices:
        why = f" {why}" if why else ""
        raise ValueError(
            f"`{name}` must be one of {choices}.{why} "
            f"Received: {name}={value!r}"
        )
    return value


def bool_arg(name, value):
    """`value` if it is a bool; raises a `ValueError` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return value


def targets_arg(targets):
    """`targets` if it is None, a non-empty str or a list/tuple of
    non-empty strs; raises a `TypeError` or `ValueError` otherwise (an
    empty regex would match, and adapt, every layer)."""
    items = [targets] if isinstance(targets, str) else targets
    if targets is not None and not (
        isinstance(items, (list, tuple))
        and all(isinstance(t, str) for t in items)
    ):
        raise TypeError(
            "`targets` must be None (the family default), a list of role "
            "aliases, layer names or paths (str), or a regex string, e.g. "
            f"`targets=['q', 'v']`. Received: targets={targets!r}"
        )
    if targets is not None and any(not t.strip() for t in items):
        raise ValueError(
            "`targets` must not be empty or hold an empty name: an empty "
            "regex matches every layer. Pass None for the family default, "
            "role aliases (`targets=['q', 'v']`), or `targets='.*'` to adapt "
            f"every Dense and EinsumDense on purpose. Received: "
            f"targets={targets!r}"
        )
    return targets


def adapter_args(experts, alpha, dropout, router_input, top_k, balance_loss):
    """The checked adapter arguments of `ReloraDense` and `enable_relora`.

    Returns:
        A dict with the same keys, numbers as python ints and floats.
    """
    experts = int_arg(
        "experts", experts, 1, "an int >= 1 (1 means a single B, no router)"
    )
    choice_arg("router_input", router_input, ROUTER_INPUTS)
    if top_k is not None:
        top_k = int_arg(
            "top_k",
            top_k,
            1,
            f"None (dense gates) or an int in [1, experts={experts}]",
            maximum=experts,
        )
    if alpha is not None:
        alpha = float_arg(
            "alpha",
            alpha,
            "a positive finite float or None (None: `rank`)",
            lambda v: v > 0,
        )
    dropout = float_arg(
        "dropout", dropout, "a float in [0, 1)", lambda v: 0.0 <= v < 1.0
    )
    balance_loss = float_arg(
        "balance_loss",
        balance_loss,
        "a finite float >= 0 (0 disables it)",
        lambda v: v >= 0,
    )
    return dict(
        experts=experts,
        alpha=alpha,
        dropout=dropout,
        router_input=router_input,
        top_k=top_k,
        balance_loss=balance_loss,
    )
