"""Reading the code blocks and tables of the README and of docs/ pages.

Used by `test_readme.py` and `test_docs.py`, which run the python blocks
and check the rest against the code.
"""

import ast
import importlib.util
import re
import shlex

# A fence at the start of a line, its language, its body, its closing fence.
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
PYTHON = ("python", "py", "python3")
BACKENDS = ("jax", "tensorflow", "torch")
# The first line of a python block may say how the tests treat it:
#   # docs-test: skip (why: e.g. it loads real weights)
#   # docs-test: backends jax, tensorflow
_MARKER = re.compile(r"#\s*docs-test:\s*(.*)")


def code_blocks(text, languages):
    """The bodies of the fenced blocks in one of `languages`, in order."""
    return [body for lang, body in _FENCE.findall(text) if lang in languages]


def all_fence_languages(text):
    """The language of every fence opening, indented ones included."""
    languages, inside = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("```"):
            continue
        if not inside:
            languages.append(stripped[3:].split()[0] if stripped[3:] else "")
        inside = not inside
    return languages


class Directive:
    """How a python block runs: always, never (`skip`), or on `backends`."""

    def __init__(self, skip=None, backends=None):
        self.skip = skip  # The reason, or None.
        self.backends = backends  # A tuple of backend names, or None.

    def runs_on(self, backend):
        if self.skip is not None:
            return False
        return self.backends is None or backend in self.backends


def directive(block):
    """The block's `# docs-test:` directive; raises on an unknown one."""
    first = block.lstrip("\n").splitlines()[0] if block.strip() else ""
    match = _MARKER.match(first.strip())
    if not match:
        return Directive()
    words = match.group(1).strip()
    if words.startswith("skip"):
        reason = words[len("skip") :].strip(" ()-:")
        if not reason:
            raise ValueError(
                "A `# docs-test: skip` marker must say why, e.g. "
                f"`# docs-test: skip (loads real weights)`. Received: {first}"
            )
        return Directive(skip=reason)
    if words.startswith("backends"):
        names = tuple(
            n.strip() for n in words[len("backends") :].split(",") if n
        )
        if not names or not set(names) <= set(BACKENDS):
            raise ValueError(
                f"`# docs-test: backends` takes names from {BACKENDS}. "
                f"Received: {first}"
            )
        return Directive(backends=names)
    raise ValueError(
        "Unknown `# docs-test:` marker; use `skip (why)` or "
        f"`backends a, b`. Received: {first}"
    )


def variants_table(text):
    """`{variant: kwargs}` from the table whose header starts with
    `| variant | `enable_relora` arguments |`."""
    rows = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| variant | `enable_relora` arguments"):
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                name, arguments = [c.strip() for c in row.split("|")[1:3]]
                call = ast.parse(f"f({arguments.strip('`')})", mode="eval")
                rows[name.strip("`")] = {
                    k.arg: ast.literal_eval(k.value) for k in call.body.keywords
                }
            return rows
    raise AssertionError("No variants table found.")


_BENCHMARK = re.compile(
    r"^(?:[A-Z_]+=\S+\s+)*(?:nice -n -?\d+\s+)?\.venv/bin/python "
    r"(benchmarks/\S+\.py)(.*)$"
)


def benchmark_commands(text):
    """`(script, flags)` of every benchmark command line in text blocks."""
    found = []
    for block in code_blocks(text, ("text", "")):
        for line in block.splitlines():
            match = _BENCHMARK.match(line.strip())
            if match:
                found.append((match.group(1), shlex.split(match.group(2))))
    return found


def check_benchmark_command(root, script, flags):
    """The script exists and its argument parser accepts `flags`."""
    path = root / script
    assert path.is_file(), f"A command names a missing script: {script}"
    if not flags and "def parse_args" not in path.read_text():
        return  # A script without flags; nothing more to check.
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_args(flags)  # argparse exits (SystemExit) on a bad flag
