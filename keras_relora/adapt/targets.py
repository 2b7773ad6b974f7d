"""Which layers of a model are adapted, their roles and their blocks.

A *role* names what a projection does (`q`, `k`, `v`, `o`, `gate`, `up`,
`down`) whatever each keras-hub family calls it; A is shared per role. A
*block* is the transformer block a layer sits in, the unit of the Reducer.
"""

import re

import keras

from keras_relora import _keras_internals

ROLES = ("q", "k", "v", "o", "gate", "up", "down")

# (regex on the layer path, role). Order matters: first match wins. Roles
# are only given to layers inside a block (a path component ending `_<n>`).
_ROLE_RULES = [
    (r"/(query|query_proj|q_proj)$", "q"),
    (r"/(key|key_proj|k_proj)$", "k"),
    (r"/(value|value_proj|v_proj)$", "v"),
    (r"/(attention_qkv|qkv|qkv_proj)$", "qkv"),
    (r"/(attention_output|out_proj|o_proj|attention_proj)$", "o"),
    (r"/(feedforward_gate_dense|ffw_gating|gate_proj)$", "gate"),
    (
        r"/(feedforward_intermediate_dense|ffw_gating_2|up_proj|fc1|"
        r"mlp_dense_1|mlp/dense1|encoder_block_\d+/dense_1)$",
        "up",
    ),
    (
        r"/(feedforward_output_dense|ffw_linear|down_proj|fc2|"
        r"mlp_dense_2|mlp/dense2|encoder_block_\d+/dense_2)$",
        "down",
    ),
]
_BLOCK = re.compile(r"^(.*?[^/]*_(\d+))/")
# Paths that a family's default targets leave out (asked for explicitly,
# they are adapted like any other layer).
_DEFAULT_EXCLUDE = re.compile(
    r"(^|/)(image_encoder|vision_encoder|clip_l|clip_g|t5|vae)"
)

ADAPTABLE = (keras.layers.Dense, keras.layers.EinsumDense)


def layer_path(layer):
    """The layer's path, e.g. `transformer_layer_0/self_attention/query`."""
    if layer.path:
        return layer.path
    return layer.kernel.path.rsplit("/", 1)[0]


def relative_path(model, path):
    """`path` without a leading `<model name>/`.

    Keras names a layer's path after the scopes it was built in: the
    layers of a subclassed model are `model_name/layer` when built by a
    call (and the name is `two_block_mlp_1` for the second instance) but
    `layer` when built from a config. Roles, blocks and saved paths use the
    relative path, so none of them depends on the model's name.
    """
    prefix = model.name + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def block_key(path):
    """The block a path belongs to: its first `<name>_<n>/` prefix.

    A layer outside any block is a block of its own.
    """
    match = _BLOCK.match(path)
    return match.group(1) if match else path


def role_of(path):
    if block_key(path) != path:
        for pattern, role in _ROLE_RULES:
            if re.search(pattern, "/" + path):
                return role
    return re.sub(r"_\d+$", "", path.rsplit("/", 1)[-1])


def _natural(key):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def candidates(model):
    """All adaptable layers of `model`, as `{path: (layer, role)}`."""
    found = {}
    for layer in _keras_internals.flatten_layers(model):
        if isinstance(layer, ADAPTABLE) and layer.built:
            path = layer_path(layer)
            found[path] = (layer, role_of(relative_path(model, path)))
    return found


def _matches(item, path, role):
    if item == role or (role == "qkv" and item in ("q", "k", "v")):
        return True
    return item == path or item == path.rsplit("/", 1)[-1]


def default_targets(found):
    """The family default: the paper's Table 9 targets where they exist."""
    roles = {role for _, role in found.values()}
    if "qkv" in roles:  # Stable Diffusion 3's MMDiT: attention only.
        return ("q", "k", "v", "o")
    if roles & set(ROLES):
        return ("q", "k", "v", "up", "down")
    return None  # A plain model: every Dense and EinsumDense.


def select(model, targets):
    """Resolves `targets` on `model` to `[(path, layer, role)]`.

    Args:
        model: The model to search.
        targets: None (family default), a sequence of role aliases
            (`q, k, v, o, gate, up, down`) or exact layer names or paths,
            or a string regex searched in layer paths.
    """
    found = candidates(model)
    if targets is None:
        wanted = default_targets(found)
        chosen = [
            path
            for path, (_, role) in found.items()
            if not _DEFAULT_EXCLUDE.search(path)
            and (
                wanted is None
                or any(_matches(item, path, role) for item in wanted)
            )
        ]
        if wanted is not None and not chosen:
            chosen = [
                path
                for path, (_, role) in found.items()
                if any(_matches(item, path, role) for item in wanted)
            ]
    elif isinstance(targets, str) and not any(
        _matches(targets, path, role) for path, (_, role) in found.items()
    ):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(
                f"`targets`={targets!r} is neither a role, a layer name nor "
                f"a valid regex ({error})."
            ) from None
        chosen = [path for path in found if pattern.search(path)]
    else:
        items = [targets] if isinstance(targets, str) else list(targets)
        chosen = []
        for item in items:
            hits = [
                path
                for path, (_, role) in found.items()
                if _matches(item, path, role)
            ]
            if not hits:
                raise ValueError(_nothing_matches(f"{item!r}", found))
            chosen += [path for path in hits if path not in chosen]
    if not chosen:
        raise ValueError(_nothing_matches(f"{targets!r}", found))
    chosen.sort(key=lambda path: _natural(path))
    return [(path, found[path][0], found[path][1]) for path in chosen]


def _nothing_matches(what, found):
    if not found:
        return (
            f"`targets`={what} matches nothing: the model has no built "
            "Dense or EinsumDense layer to adapt. Build the model first."
        )
    roles = sorted({role for _, role in found.values()})
    names = sorted({path.rsplit("/", 1)[-1] for path in found})
    return (
        f"`targets`={what} matches no layer. Pass role aliases, layer names "
        "or a regex on layer paths. "
        f"Roles in this model: {roles}. Layer names: {names}."
    )


def blocks_of(paths):
    """Sorted block keys of the given paths (the Reducer's units)."""
    return sorted({block_key(p) for p in paths}, key=_natural)
