"""The documentation points at things that exist.

Every repository path written in backticks in README.md and docs/*.md (`pretrain/data/loader.py`,
`kernels/`, `ds_configs/zero<stage>.json`, `pretrain/checkpoint` for a module that may be a file or
a package) exists, and every `path.py::name` names a top-level function or class of that file;
no tracked file cites the design record the repo does not ship.

    python -m pytest tests/test_docs.py -q
"""
from __future__ import annotations

import ast
import re
import subprocess

from tests.helpers import REPO

TOPS = ("pretrain", "kernels", "tools", "tests", "docs", "ds_configs")
_SPAN = re.compile(r"`([^`\n]+)`")


def doc_files() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def cited_paths(text: str) -> list[str]:
    """First word of every backticked span that starts with a top-level folder of the repo."""
    out = []
    for span in _SPAN.findall(text):
        word = span.split()[0] if span.split() else ""
        if word.split("/")[0] in TOPS and "/" in word:
            out.append(word)
    return out


def resolves(word: str) -> bool:
    path, _, name = word.partition("::")
    pattern = re.sub(r"<[^>]*>", "*", path)
    hits = list(REPO.glob(pattern)) if "*" in pattern else [p for p in (REPO / pattern, REPO / f"{pattern}.py")
                                                          if p.exists()]
    if not hits:
        return False
    if name:
        tree = ast.parse(hits[0].read_text())
        return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name for n in tree.body)
    return True


def test_paths_in_the_docs_exist():
    cited = {f"{f.name}: {w}" for f in doc_files() for w in cited_paths(f.read_text())}
    assert len(cited) > 40, f"only {len(cited)} paths found: is the pattern still right?"
    missing = sorted(c for c in cited if not resolves(c.split(": ", 1)[1]))
    assert not missing, "paths cited in the docs that do not exist:\n" + "\n".join(missing)


def test_the_checker_rejects_what_does_not_exist():
    assert resolves("pretrain/data/loader.py") and resolves("pretrain/models") and resolves("pretrain/config")
    assert resolves("ds_configs/zero<stage>.json") and resolves("kernels/attention.py::attention_ranges")
    assert not resolves("pretrain/data/ingest.py")  # moved to pretrain/data/ingest/driver.py
    assert not resolves("kernels/attention.py::no_such_function")
    assert not resolves("tools/no_such_tool.py")
    assert cited_paths("see `pretrain/batch.py` and `tools/sweep.py --widths 64`, not `x/y`") == [
        "pretrain/batch.py", "tools/sweep.py"]


def test_no_file_cites_the_design_record_the_repo_does_not_ship():
    name = "DESIGN" + ".md"  # spelled apart so that this file does not cite it either
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in files if (REPO / f).is_file() and name in (REPO / f).read_text(errors="ignore")]
    assert not citing, f"{name} is cited by {citing}; point to docs/architecture.md instead"
