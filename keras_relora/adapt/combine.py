"""`combine_adapters`: a new named adapter whose delta is a weighted sum of
other adapters' deltas, built only where that sum is exact."""

import math
import re

import numpy as np
from keras import ops

from keras_relora.adapt import named_adapters
from keras_relora.adapt.enable_relora import enable_relora
from keras_relora.adapt.enable_relora import remove_added
from keras_relora.adapt.state import require_state


def combine_adapters(model, weights, new_name):
    """Adds adapter `new_name` with the delta `sum_n weights[n] * delta_n`.

    Each adapted layer's output with the new adapter is, for every input,
    `base + sum_n w_n * delta_n(x)`, the output the adapters `n` would give
    weighted by `w_n` (any real numbers: `-1` subtracts an adapter), to
    float32 rounding. Adapter `n` adds at a layer

    ```
    delta_n(x) = s_n * sum_e g_ne(x) * (x A_n) B_ne,   s_n = alpha_n / r_n
    ```

    (`g_n1 = 1` with `experts=1`), and the new adapter has the same form,
    so the combination is exact when one router can give every term its
    gates:

    * Same `A` (bitwise, at every layer where several adapters meet) and
      the same rank: `A` is kept and `B_e = sum_n w_n s_n B_ne` (PEFT's
      `combination_type="linear"`, exact here because the `A`s are equal;
      with experts, their routers must be equal too).
    * Otherwise the ranks are concatenated (PEFT's `"cat"`):
      `A = [A_1 | A_2 | ...]`, and `B_e` stacks the blocks `w_n s_n B_ne`,
      rank `sum_n r_n`. Adapters with `experts=1` may be mixed with
      routed ones: their single `B` is copied into every expert, which is
      exact because the gates sum to 1. At each layer, at most one router
      (one gate function) may be present: the routed adapters there must
      have the same experts, `router_input`, `top_k` and router kernel
      (and, with `router_input="projected"`, the same `A`).

    Two different routers cannot be combined exactly: the gates
    `g(x) = softmax(x A W_g)` depend on the input nonlinearly, and a sum of
    two such mixtures is not one softmax mixture. Such a combination is
    refused with a `ValueError` naming the adapters and the layer, and the
    model is left unchanged. Pruned adapters contribute nothing. Layers
    adapted by some of the adapters only get zeros in the others' blocks.

    The new adapter has `alpha` equal to its rank (the scales `s_n` are
    folded into `B`), no pruned layer, the targets of all adapters, and
    the training settings (`dropout`, `balance_loss`) of the first
    adapter; `share_a="role"` when every adapter shares `A` by role (and
    the combined `A`s then agree), else `"layer"`. It is added next to
    the others and is not activated: call `keras_relora.set_adapter`.
    The model's variables change: compile it again before `fit`.

    Args:
        model: A `keras.Model` with ReLoRA adapters.
        weights: dict. Adapter name -> weight (a real number), e.g.
            `{"sst2": 0.5, "arc": 0.5}`.
        new_name: str. The new adapter's name, a Python identifier that is
            not one of `keras_relora.adapter_names(model)`.

    Returns:
        `model`.

    Example:

    ```python
    keras_relora.combine_adapters(lm, {"sst2": 0.7, "arc": 0.3}, "both")
    keras_relora.set_adapter(lm, "both")
    ```
    """
    state = require_state(model, "`combine_adapters`")
    named_adapters.check_adapter_name(new_name)
    if new_name in state.named:
        raise ValueError(
            f"`new_name` {new_name!r} is already an adapter of the model "
            f"({list(state.named)}): choose a new name, or delete that "
            f"adapter first. Received: new_name={new_name!r}"
        )
    weights = _check_weights(state, weights)
    plan = _plan(state, weights)
    _enable(model, state, plan, new_name)
    return model


def _check_weights(state, weights):
    if not isinstance(weights, dict) or not weights:
        raise TypeError(
            "`weights` must be a non-empty dict of adapter name -> weight, "
            f"e.g. `{{'sst2': 0.5, 'arc': 0.5}}`. Received: weights={weights!r}"
        )
    checked = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or name not in state.named:
            raise ValueError(
                f"`weights` names adapter {name!r}, which the model does not "
                f"have. Its adapters: {list(state.named)}. "
                f"Received: weights={weights!r}"
            )
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float, np.number))
            or not math.isfinite(float(weight))
        ):
            raise ValueError(
                f"`weights[{name!r}]` must be a finite real number. "
                f"Received: weights={weights!r}"
            )
        checked[name] = float(weight)
    return checked


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable), "float64")


class _Term:
    """One adapter at one layer: its A, scaled B's and gate function."""

    def __init__(self, name, group, path, layer_adapter, role, d_in):
        self.name = name
        self.rank = group.settings["rank"]
        adapter = layer_adapter
        self.present = adapter is not None and not adapter.pruned
        self.a = None
        if adapter is not None:
            self.a = _numpy(adapter.shared_a.kernel)
        elif group.settings["share_a"] == "role":
            shared = group.shared_a.get(f"{role}:{d_in}")
            if shared is not None:  # Keeps the role's A consistent.
                self.a = _numpy(shared.kernel)
        if self.a is None:
            self.a = np.zeros((d_in, self.rank))
        self.routed = self.present and adapter.experts > 1
        if self.present:
            scale = float(_numpy(adapter.suppression)) * (
                adapter.alpha / adapter.rank
            )
            self.b = _numpy(adapter.b_kernel) * scale  # (experts, r, d_out)
        if self.routed:
            self.gate = {
                "experts": adapter.experts,
                "router_input": adapter.router_input,
                "top_k": adapter.top_k,
                "router": _numpy(adapter.router_kernel),
            }

    def same_gates(self, other):
        mine, theirs = self.gate, other.gate
        if any(mine[k] != theirs[k] for k in ("experts", "router_input")):
            return False
        if mine["top_k"] != theirs["top_k"]:
            return False
        if not np.array_equal(mine["router"], theirs["router"]):
            return False
        return mine["router_input"] == "input" or np.array_equal(
            self.a, other.a
        )


def _plan(state, weights):
    """Everything the new adapter needs, checked before any change."""
    groups = {name: state.named[name] for name in weights}
    layers = {}
    for group in groups.values():
        for path, adapter in group.adapters.items():
            layers.setdefault(path, adapter)
    order = [p for p in _model_order(state) if p in layers]
    terms = {}
    routed_settings = {}
    for path in order:
        sample = layers[path]
        d_in, role = sample.axes.d_in, sample.role
        terms[path] = [
            _Term(n, g, path, g.adapters.get(path), role, d_in)
            for n, g in groups.items()
        ]
        routed = [t for t in terms[path] if t.routed]
        for t in routed[1:]:
            if not t.same_gates(routed[0]):
                raise ValueError(
                    f"Cannot combine adapters {routed[0].name!r} and "
                    f"{t.name!r} exactly: at layer {path!r} both route "
                    "their experts, with different routers (router "
                    "kernel, `router_input`, `top_k`, experts, or, with "
                    "`router_input='projected'`, A). The gates "
                    "g(x) = softmax(x A W_g) depend on the input "
                    "nonlinearly, so base + sum_n w_n sum_e g_ne(x) "
                    "(x A_n) B_ne is no single router's mixture. Combine "
                    "only adapters whose routers are equal, or plain "
                    "(`experts=1`) adapters with at most one routed one "
                    "per layer; or serve them live "
                    "(`keras_relora.set_adapter`, `route_examples`). "
                    "Nothing was changed."
                )
        for t in routed:
            for key in ("experts", "router_input", "top_k"):
                routed_settings.setdefault(key, {})[t.gate[key]] = t.name
    for key, found in routed_settings.items():
        if len(found) > 1:
            raise ValueError(
                "Cannot combine adapters with routers of different "
                f"`{key}` ({ {v: n for v, n in found.items()} }) into one "
                "adapter: a ReLoRA adapter has one value for all its "
                "layers. Nothing was changed."
            )
    ranks = {g.settings["rank"] for g in groups.values()}
    linear = len(ranks) == 1 and all(
        all(np.array_equal(t.a, ts[0].a) for t in ts if t.present)
        for ts in terms.values()
        if any(t.present for t in ts)
    )
    first = next(iter(groups.values())).settings
    experts = next(iter(routed_settings.get("experts", {1: None})))
    settings = {
        "rank": ranks.pop()
        if linear
        else sum(g.settings["rank"] for g in groups.values()),
        "experts": experts,
        "router_input": next(
            iter(routed_settings.get("router_input", {"projected": None}))
        ),
        "top_k": next(iter(routed_settings.get("top_k", {None: None}))),
        "dropout": first["dropout"],
        "balance_loss": first["balance_loss"] if experts > 1 else 0.0,
        "train_a": all(g.settings["train_a"] for g in groups.values()),
    }
    values = {
        path: _layer_values(ts, weights, settings, linear)
        for path, ts in terms.items()
    }
    roles = all(g.settings["share_a"] == "role" for g in groups.values())
    if roles:
        by_key = {}
        for path in order:
            key = (layers[path].role, layers[path].axes.d_in)
            by_key.setdefault(key, []).append(values[path][0])
        roles = all(
            all(np.array_equal(a, group[0]) for a in group)
            for group in by_key.values()
        )
    settings["share_a"] = "role" if roles else "layer"
    return {"order": order, "settings": settings, "values": values}


def _model_order(state):
    """Every layer path that some adapter of the model adapts, sorted."""
    seen = {}
    for group in state.named.values():
        for path in group.adapters:
            seen.setdefault(path, None)
    return sorted(seen)


def _layer_values(terms, weights, settings, linear):
    """`(A, B, router or None)` of the new adapter at one layer."""
    experts, rank = settings["experts"], settings["rank"]
    d_in = terms[0].a.shape[0]
    present = [t for t in terms if t.present]
    d_out = present[0].b.shape[-1] if present else None
    if linear:
        a = present[0].a if present else terms[0].a
        blocks = [(t, slice(0, rank)) for t in terms]
    else:
        a = np.concatenate([t.a for t in terms], axis=1)
        starts = np.cumsum([0] + [t.rank for t in terms])
        blocks = [
            (t, slice(int(s), int(s) + t.rank))
            for t, s in zip(terms, starts, strict=False)
        ]
    if d_out is None:  # Every adapter pruned here: no contribution.
        return a, None, None
    b = np.zeros((experts, rank, d_out))
    for t, rows in blocks:
        if not t.present:
            continue
        for e in range(experts):
            b[e, rows] += weights[t.name] * t.b[e if t.routed else 0]
    router = None
    if experts > 1:
        routed = [(t, rows) for t, rows in blocks if t.routed]
        if settings["router_input"] == "input":
            router = np.zeros((d_in, experts))
            if routed:
                router = routed[0][0].gate["router"]
        else:
            router = np.zeros((rank, experts))
            if routed:
                t, rows = routed[0]
                router[rows] = t.gate["router"]
    return a, b, router


def _enable(model, state, plan, new_name):
    settings = plan["settings"]
    enable_relora(
        model,
        settings["rank"],
        settings["experts"],
        alpha=float(settings["rank"]),
        targets="^(?:" + "|".join(re.escape(p) for p in plan["order"]) + ")$",
        share_a=settings["share_a"],
        train_a=settings["train_a"],
        dropout=settings["dropout"],
        router_input=settings["router_input"],
        top_k=settings["top_k"],
        balance_loss=settings["balance_loss"],
        adapter_name=new_name,
    )
    try:
        group = state.named[new_name]
        for path, adapter in group.adapters.items():
            a, b, router = plan["values"][path]
            kernel = adapter.shared_a.kernel
            adapter.shared_a.kernel.assign(a.astype(kernel.dtype))
            if b is None:
                b = np.zeros(tuple(adapter.b_kernel.shape))
            adapter.b_kernel.assign(b.astype(adapter.b_kernel.dtype))
            if router is not None:
                adapter.router_kernel.assign(
                    router.astype(adapter.router_kernel.dtype)
                )
    except BaseException:
        remove_added(model, state, new_name)
        raise
