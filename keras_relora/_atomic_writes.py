"""Atomic writes: a file or a folder appears complete or not at all.

Every file keras_relora writes is written under a temporary name in the
destination's own folder (so the final rename stays on one file system)
and moved into place with `os.replace`: a process killed mid-write leaves
the previous file as it was, plus at worst a hidden `.partial` leftover.
A folder (a PEFT adapter folder) is written whole in a temporary folder
and swapped with the old one, which stays until the new one is complete.
"""

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile

_PARTIAL = ".partial-"


def _temporary_folder(destination):
    parent = os.path.dirname(os.path.abspath(destination)) or "."
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.normpath(destination))
    return tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}", dir=parent)


def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(filepath):
    """Yields a temporary path to write; moves it to `filepath` on success.

    The temporary path ends with the same file name as `filepath` (so
    writers that check the suffix, `.keras` or `.weights.h5`, accept it)
    and lies in a hidden temporary folder next to `filepath`. If the
    block raises, `filepath` is left as it was.
    """
    filepath = os.fspath(filepath)
    folder = _temporary_folder(filepath)
    partial = os.path.join(folder, os.path.basename(filepath))
    try:
        yield partial
        _fsync(partial)
        os.replace(partial, filepath)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_bytes(filepath, data):
    """Writes `data` to `filepath` atomically."""
    with atomic_file(filepath) as partial:
        with open(partial, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_folder(folder, keep=()):
    """Yields a temporary folder to fill; swaps it in as `folder` on success.

    An existing `folder` stays whole until the new one is complete: the
    two are exchanged in one step where the system allows it (Linux's
    `renameat2`), otherwise the old one is renamed aside just before the
    new one takes its name. Entries of the old folder other than those the
    block writes are carried over (hard links where possible), so only
    the written files change. If the block raises, `folder` is left as
    it was.
    """
    folder = os.fspath(folder)
    partial = _temporary_folder(folder)
    try:
        yield partial
        if os.path.isdir(folder):
            written = set(os.listdir(partial))
            for entry in os.listdir(folder):
                if entry not in written:
                    _link_or_copy(
                        os.path.join(folder, entry),
                        os.path.join(partial, entry),
                    )
        for entry in os.listdir(partial):
            _fsync(os.path.join(partial, entry))
        _fsync(partial)
        _swap_in(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _link_or_copy(source, target):
    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, target, symlinks=True, copy_function=_link)
    else:
        _link(source, target)


def _link(source, target):
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(partial, folder):
    """Puts `partial` at `folder`; `partial` then holds the old folder."""
    if not os.path.exists(folder):
        os.replace(partial, folder)
        return
    if _exchange(partial, folder):
        return
    aside = _temporary_folder(folder)
    os.rmdir(aside)
    os.replace(folder, aside)
    try:
        os.replace(partial, folder)
    except BaseException:
        os.replace(aside, folder)
        raise
    os.replace(aside, partial)  # Removed with the temporary folder.


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a, b):
    """Swaps two paths in one step (Linux `renameat2`); False if unable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD,
        os.fsencode(os.path.abspath(a)),
        _AT_FDCWD,
        os.fsencode(os.path.abspath(b)),
        _RENAME_EXCHANGE,
    )
    return result == 0
