"""Runs every ```python block of README.md, in order, in one namespace.

The ```bash blocks are the two commands `make demo` and `make test`: CI runs
the second; the first is covered by the main job's tiny-mode test. The
```text blocks are the method's formulas and benchmark command lines: every
benchmark command must name an existing script whose argument parser
accepts its flags (running them is `benchmarks/`'s job, not CI's).
"""

import importlib.util
import os
import pathlib
import re
import shlex

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_two_commands():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(bash) == 1
    commands = [line.split("#")[0].strip() for line in bash[0].splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 4
    namespace = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)


def benchmark_commands():
    text = README.read_text()
    blocks = re.findall(r"```text\n(.*?)```", text, flags=re.S)
    return [
        shlex.split(line)
        for block in blocks
        for line in block.splitlines()
        if line.startswith(".venv/bin/python benchmarks/")
    ]


def test_readme_benchmark_commands_parse(monkeypatch):
    commands = benchmark_commands()
    assert len(commands) >= 2
    root = README.parent
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    for _, script, *flags in commands:
        path = root / script
        assert path.is_file(), f"README names a missing script: {script}"
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.parse_args(flags)  # argparse exits (SystemExit) on a bad flag
