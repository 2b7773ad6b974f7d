"""`relora_offline.smollm2.convert_once`: the offline models' cache.

A converted folder is written once: processes that convert the same model
side by side (the backends' suites, two jobs) take turns, and a folder is
never seen half-written.
"""

import os
import threading
import time

import pytest

from relora_offline.smollm2 import convert_once


def _is_complete(folder):
    return os.path.isfile(os.path.join(folder, "done"))


def test_racing_conversions_write_once(tmp_path):
    writes = []
    barrier = threading.Barrier(3)

    def write_folder(tmp):
        writes.append(tmp)
        time.sleep(0.3)  # Long enough for the others to reach the lock.
        with open(os.path.join(tmp, "done"), "w") as f:
            f.write("1")

    results = []

    def convert():
        barrier.wait()
        results.append(
            convert_once(str(tmp_path), "model", write_folder, _is_complete)
        )

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = str(tmp_path / "model")
    assert len(writes) == 1
    assert results == [folder] * 3
    assert _is_complete(folder)
    assert sorted(os.listdir(tmp_path)) == ["model", "model.lock"]
    # A complete folder is reused without writing.
    assert convert_once(str(tmp_path), "model", write_folder, _is_complete)
    assert len(writes) == 1


def test_incomplete_folder_is_replaced_and_failures_leave_nothing(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "partial").write_text("x")

    def fail(tmp):
        with open(os.path.join(tmp, "half"), "w") as f:
            f.write("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_once(str(tmp_path), "model", fail, _is_complete)
    # No temporary folder left; the old partial folder untouched.
    assert sorted(os.listdir(tmp_path)) == ["model", "model.lock"]
    assert os.listdir(folder) == ["partial"]

    def write_folder(tmp):
        with open(os.path.join(tmp, "done"), "w") as f:
            f.write("1")

    assert convert_once(
        str(tmp_path), "model", write_folder, _is_complete
    ) == str(folder)
    assert os.listdir(folder) == ["done"]
