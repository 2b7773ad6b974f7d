"""The README: its code runs and what it states matches the code.

- Every ```python block runs, in order, in one namespace, on this
  process's backend.
- The ```bash blocks are the install commands (their extras exist in
  pyproject.toml) and the two set-up commands of a fresh clone, exactly
  `make demo` and `make test` (CI runs the second; the main job's tiny
  mode covers the first).
- The ```text blocks hold the formula and benchmark command lines: every
  benchmark command names a script whose argument parser accepts its
  flags (running them is `benchmarks/`'s job, not CI's).
- The variants table is `keras_relora.VARIANTS`, the README stays short,
  and its relative links point to files that exist.
"""

import os
import pathlib
import re

import markdown_blocks as mb

import keras_relora

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_LINES = 200


def test_readme_has_the_two_commands():
    text = README.read_text()
    bash = mb.code_blocks(text, ("bash",))
    setup = [b for b in bash if "make " in b]
    assert len(setup) == 1
    commands = [line.split("#")[0].strip() for line in setup[0].splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "docs"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_readme_install_commands_name_existing_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1]
    section = section.split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.M))
    installs = [
        line.split("#")[0].strip()
        for block in mb.code_blocks(README.read_text(), ("bash",))
        for line in block.splitlines()
        if line.startswith("pip install")
    ]
    assert installs
    for line in installs:
        match = re.fullmatch(r'pip install "\.\[([\w,-]+)\]"', line)
        assert match, line
        assert set(match.group(1).split(",")) <= extras, (line, extras)


def test_readme_python_blocks_run(tmp_path):
    blocks = mb.code_blocks(README.read_text(), mb.PYTHON)
    assert len(blocks) >= 2
    namespace = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)


def test_readme_benchmark_commands_parse(monkeypatch):
    commands = mb.benchmark_commands(README.read_text())
    assert len(commands) >= 2
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for script, flags in commands:
        mb.check_benchmark_command(ROOT, script, flags)


def test_readme_variants_table_is_variants():
    assert mb.variants_table(README.read_text()) == keras_relora.VARIANTS


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target
