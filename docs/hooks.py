"""MkDocs hook: publishes benchmarks/RESULTS.md as the page `results.md`.

The measured numbers live beside the scripts that produce them
(`benchmarks/RESULTS.md`); the site shows that file as it is, so the two
never disagree. Its link to `README.md` (the benchmarks' own README) points
to the Benchmarks guide on the site.
"""

import pathlib
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PAGE = "results.md"


def on_files(files, config):
    text = RESULTS.read_text(encoding="utf-8")
    text = re.sub(r"\]\(README\.md(#[^)]*)?\)", r"](benchmarks.md\1)", text)
    files.append(File.generated(config, PAGE, content=text))
    return files
