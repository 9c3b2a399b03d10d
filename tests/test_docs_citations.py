"""The repository explains itself: nothing in it cites a document that is not in it.

Every `NAME.md` mentioned in code, help texts, errors, manifests and READMEs must resolve to a file
of the repository (relative to the citing file, to the repository root, or under `docs/`), and
the names of documents that only ever existed outside it ("the spec's table", "contract B") must
not come back.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ".html"}
NAMES = {"Makefile"}
SKIP_DIRS = {".git", ".venv", ".cache", "__pycache__", "runs", "demo-out", "node_modules"}
# A quoted bare file name ("notes.md" in a test's list of inputs) is data, not a citation.
MD_REF = re.compile(r"""(?<![\w/.-])(?<!["'])((?:[\w.-]+/)*[\w-]+\.md)\b(?!["'])""")
# Names by which code once cited documents that were never in the repository.
OUTSIDE_NAMES = re.compile(r"spec's table|spec's definition|\bcontract [A-Z]\b")


def repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (falls back to a walk outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split("\n")
        paths = [REPO / p for p in out if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    return [p for p in paths if p.is_file() and (p.suffix in SUFFIXES or p.name in NAMES)
            and p != Path(__file__).resolve()]


def cited_documents(text: str) -> list[str]:
    return MD_REF.findall(text)


def resolves(ref: str, citing: Path) -> bool:
    return any((base / ref).is_file() for base in (citing.parent, REPO, REPO / "docs")) or is_output(ref)


def is_output(ref: str) -> bool:
    """A path under a git-ignored folder (`benchmarks/results/...`) names what a command writes,
    not a document to read."""
    if "/" not in ref:
        return False
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", ref], cwd=REPO, capture_output=True)
    return r.returncode == 0


def test_every_cited_document_is_in_the_repository():
    missing = []
    for path in repo_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for ref in cited_documents(line):
                if not resolves(ref, path):
                    missing.append(f"{path.relative_to(REPO)}:{n}: {ref}")
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_no_citation_of_outside_documents_by_name():
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
             for p in repo_files()
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if OUTSIDE_NAMES.search(line)]
    assert not found, "citations of documents outside the repository:\n" + "\n".join(found)


def test_the_checker_finds_a_missing_document(tmp_path):
    """The grep itself: a citation of a file that does not exist is caught, an existing one is not."""
    citing = tmp_path / "x.py"
    assert cited_documents('"""See formats.md and docs/captions.md, not notes.mdx; "notes.md" is data."""') == ["formats.md", "docs/captions.md"]
    assert resolves("formats.md", citing)  # found under docs/
    assert resolves("docs/captions.md", citing)
    assert not resolves("quality.md", citing)
    assert not resolves("overview.md", citing)
    assert resolves("benchmarks/results/mutation.md", citing)  # written by a command, git-ignored
    assert not resolves("docs/nowhere.md", citing)
    assert OUTSIDE_NAMES.search("(see the spec's table)") and OUTSIDE_NAMES.search("sample dict (contract B)")
