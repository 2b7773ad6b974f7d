"""Runs a several-device script in a subprocess; returns its RESULT line.

The scripts (`distributed_*.py`) set up their own backend and devices, so
the test process's backend and devices stay untouched.
"""

import json
import os
import subprocess
import sys

from distributed_common import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(name, backend, timeout=600):
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        OMP_NUM_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=xla_flags(),  # The script sets its own device count.
    )
    process = subprocess.run(
        [sys.executable, os.path.join(HERE, name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    (line,) = [
        line
        for line in process.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    return json.loads(line[len("RESULT ") :])
