"""The documentation site (docs/, mkdocs.yml).

- `mkdocs build --strict` succeeds: no broken link, no missing page, every
  API name resolves (skipped only where mkdocs is not installed; it is in
  requirements.txt, so CI builds it); on one backend, as the build does
  not depend on it.
- Every python block of every guide runs, in order, one namespace per
  page, on this process's backend. A block may start with
  `# docs-test: skip (why)` (it needs real weights or several processes)
  or `# docs-test: backends a, b` (backend-specific code); the skips are
  few and counted here.
- The API reference documents exactly `keras_relora.__all__`.
- The variants table equals `keras_relora.VARIANTS`, benchmark commands
  name scripts whose parsers accept their flags, and the version is
  defined once (pyproject.toml), read by `keras_relora.__version__` and
  heading CHANGELOG.md.
"""

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

import keras
import markdown_blocks as mb
import pytest
from backends import only_on

import keras_relora

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GUIDES = sorted(p.name for p in DOCS.glob("*.md"))
# Blocks that no test runs: keep them few (real weights, several processes).
MAX_SKIPPED = 4


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")]
    missing = [p for p in pages if f": {p}" not in config]
    assert not missing, f"Pages missing from mkdocs.yml's nav: {missing}"
    assert "results.md" in config  # Generated from benchmarks/RESULTS.md.


@only_on("jax", "the site build (backend-independent)")
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    # The generated page and one API entry per public name are there.
    results = (site / "results" / "index.html").read_text()
    assert "Benchmark results" in results
    api = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    headings = {
        re.sub(r"<[^>]+>|\s|¶", "", h)
        for h in re.findall(r"<h2 id=[^>]*>(.*?)</h2>", api, re.S)
    }
    for name in keras_relora.__all__:
        assert any(h.startswith(f"keras_relora.{name}") for h in headings), (
            name,
            sorted(headings),
        )


def test_python_blocks_are_top_level_and_markers_known():
    skipped = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        fenced = [
            lang for lang in mb.all_fence_languages(text) if lang in mb.PYTHON
        ]
        blocks = mb.code_blocks(text, mb.PYTHON)
        # An indented block would be missed by the runner: refuse it.
        assert len(blocks) == len(fenced), f"{page.name}: indented block"
        for block in blocks:
            rule = mb.directive(block)  # Raises on an unknown marker.
            if rule.skip is not None:
                skipped.append((page.name, rule.skip))
    assert len(skipped) <= MAX_SKIPPED, (
        f"{len(skipped)} python blocks of docs/ are never run (at most "
        f"{MAX_SKIPPED}): {skipped}"
    )


@pytest.mark.parametrize("page", GUIDES)
def test_guide_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = mb.code_blocks((DOCS / page).read_text(), mb.PYTHON)
    backend = keras.config.backend()
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        if mb.directive(block).runs_on(backend):
            exec(compile(block, f"docs/{page} block {i}", "exec"), namespace)


def _resolve(path):
    """The object at a dotted path (a module, then attributes)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(path)


def api_entries():
    """`(public name, documented path)` of every `:::` entry of docs/api.

    An entry documents `keras_relora.<name>`, or the object's defining
    path with `heading: keras_relora.<name>` (where a module of the same
    name would shadow the object in static analysis).
    """
    entries = []
    for page in sorted((DOCS / "api").glob("*.md")):
        for match in re.finditer(
            r"^::: ([\w.]+)\n((?:    .*\n)*)", page.read_text(), re.M
        ):
            path, options = match.groups()
            heading = re.search(r"heading: keras_relora\.(\w+)", options)
            if heading:
                name = heading.group(1)
            else:
                assert path.count(".") == 1, path
                name = path.split(".")[1]
            entries.append((name, path))
    return entries


def test_api_reference_covers_every_public_name():
    entries = api_entries()
    names = [name for name, _ in entries]
    assert len(names) == len(set(names)), "a name is documented twice"
    assert set(names) == set(keras_relora.__all__)
    for name, path in entries:
        # The documented object is the public one (not a same-named module).
        assert _resolve(path) is getattr(keras_relora, name), (name, path)


def test_variants_table_is_variants():
    table = mb.variants_table((DOCS / "variants.md").read_text())
    assert table == keras_relora.VARIANTS


def test_benchmark_commands_parse(monkeypatch):
    commands = []
    for page in sorted(DOCS.glob("*.md")):
        commands += mb.benchmark_commands(page.read_text())
    assert len(commands) >= 5
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for script, flags in commands:
        mb.check_benchmark_command(ROOT, script, flags)


def test_version_is_defined_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.M).group(1)
    assert keras_relora.__version__ == version
    assert importlib.metadata.version("keras-relora") == version
    source = (ROOT / "keras_relora" / "__init__.py").read_text()
    assert version not in source
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, re.M)
    assert releases and releases[0] == version
