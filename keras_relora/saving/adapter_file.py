"""The adapter file format: a safetensors file with settings and a digest.

Writing is atomic (a partial file is moved into place); reading checks the
header (through `safetensors.safe_open`), the format and version, and the
SHA-256 digest before returning anything. What the tensors and settings
mean is `checkpoint`'s concern.

Versions: "2" (the current one) digests the format, the version, the
`relora` settings and the `base` description as well as the tensors, so a
changed setting in the header (`alpha`, `top_k`) is refused like a changed
tensor. "1" digests the tensors only; such files still load.
"""

import hashlib
import json
import os

from keras_relora import _atomic_writes

FORMAT = "keras_relora.adapters"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# The metadata fields a version-2 digest covers, in order.
_DIGESTED = ("format", "version", "relora", "base")
SUFFIX = ".safetensors"


def check_path(filepath):
    filepath = os.fspath(filepath)
    if not str(filepath).endswith(SUFFIX):
        raise ValueError(
            f"`filepath` must end in `{SUFFIX}` (a safetensors file). "
            f"Received: filepath={filepath!r}"
        )
    return filepath


def safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "Adapter checkpoints need the `safetensors` package: "
            "`pip install safetensors`."
        ) from None
    return safetensors.numpy


def write(filepath, tensors, *, relora, base):
    """Writes `tensors` and the JSON-able `relora`/`base` descriptions."""
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "relora": json.dumps(relora),
        "base": json.dumps(base),
    }
    metadata["sha256"] = _digest(tensors, metadata)
    data = safetensors_numpy().save(tensors, metadata=metadata)
    _atomic_writes.write_bytes(filepath, data)


def _digest(tensors, metadata):
    """SHA-256 of the tensors and, from version 2, of the metadata."""
    sha = hashlib.sha256()
    if metadata.get("version") != "1":
        for key in _DIGESTED:
            value = str(metadata.get(key))
            sha.update(f"{key}|{len(value)}|{value}|".encode())
    for key in sorted(tensors):
        value = tensors[key]
        sha.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def read(filepath):
    """`(relora, base, tensors)` of a checked adapter file."""
    filepath = check_path(filepath)
    safetensors_numpy()  # A clear ImportError if it is missing.
    from safetensors import safe_open

    def invalid(reason):
        return ValueError(
            f"{filepath!r} is not a valid keras_relora adapter file: "
            f"{reason}. It may be truncated or corrupted, or not written "
            "by `save_relora_weights`; nothing was loaded."
        )

    if not os.path.isfile(filepath):
        raise FileNotFoundError(f"No adapter file at {filepath!r}.")
    try:
        with safe_open(filepath, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # SafetensorError is not importable alone.
        raise invalid(f"safetensors could not read it ({error})") from None
    if metadata.get("format") != FORMAT:
        raise invalid(
            f"its format is {metadata.get('format')!r}, not {FORMAT!r}"
        )
    if metadata.get("version") not in READABLE_VERSIONS:
        raise invalid(
            f"its version is {metadata.get('version')!r}; this "
            f"keras_relora reads versions {', '.join(READABLE_VERSIONS)}"
        )
    if _digest(tensors, metadata) != metadata.get("sha256"):
        covered = (
            "tensor data"
            if metadata["version"] == "1"
            else "settings, base description or tensor data"
        )
        raise invalid(f"its {covered} does not match its SHA-256 digest")
    try:
        relora = json.loads(metadata["relora"])
        base = json.loads(metadata["base"])
    except (KeyError, ValueError) as error:
        raise invalid(f"its settings cannot be read ({error})") from None
    return relora, base, tensors
