"""The adapter file format: a safetensors file with settings and a digest.

Writing is atomic (a partial file is moved into place); reading checks the
header, the format and version, and the SHA-256 digest before returning
anything. What the tensors and settings mean is `checkpoint`'s concern.
"""

import hashlib
import json
import os

FORMAT = "keras_relora.adapters"
VERSION = "1"
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
        "sha256": _digest(tensors),
    }
    data = safetensors_numpy().save(tensors, metadata=metadata)
    partial = f"{filepath}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, filepath)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _digest(tensors):
    sha = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        sha.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def read(filepath):
    """`(relora, base, tensors)` of a checked adapter file."""
    filepath = check_path(filepath)
    with open(filepath, "rb") as f:
        data = f.read()

    def invalid(reason):
        return ValueError(
            f"{filepath!r} is not a valid keras_relora adapter file: "
            f"{reason}. It may be truncated or corrupted, or not written "
            "by `save_relora_weights`; nothing was loaded."
        )

    if len(data) < 8:
        raise invalid(f"it has only {len(data)} bytes")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise invalid(
            f"its header needs {size} bytes but the file has "
            f"{len(data) - 8} after the length field"
        )
    try:
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as error:
        raise invalid(f"its header is not valid JSON ({error})") from None
    if metadata.get("format") != FORMAT:
        raise invalid(
            f"its format is {metadata.get('format')!r}, not {FORMAT!r}"
        )
    if metadata.get("version") != VERSION:
        raise invalid(
            f"its version is {metadata.get('version')!r}; this "
            f"keras_relora reads version {VERSION}"
        )
    try:
        tensors = safetensors_numpy().load(data)
    except Exception as error:  # SafetensorError is not importable alone.
        raise invalid(f"safetensors could not read it ({error})") from None
    if _digest(tensors) != metadata.get("sha256"):
        raise invalid("its tensor data does not match its SHA-256 digest")
    try:
        relora = json.loads(metadata["relora"])
        base = json.loads(metadata["base"])
    except (KeyError, ValueError) as error:
        raise invalid(f"its settings cannot be read ({error})") from None
    return relora, base, tensors
