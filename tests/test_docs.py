"""The repository stands on its own: no tracked file points outside it, every citation of
docs/algorithm.md names a section that exists, and every function the documents name exists."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
DOCS = sorted((ROOT / "docs").glob("*.md"))

# Pointers outside the repository: the steering notes, the shared folder next to a checkout, and
# absolute paths of a development machine (`/work/...`, not `data/work/` or `../work/`).
OUTSIDE = {
    "QT_SPEC": re.compile(r"QT_SPEC"),
    "../shared": re.compile(r"\.\./shared"),
    "an absolute /work/ path": re.compile(r"(?<![\w.~-])/work/"),
}
CITATION = re.compile(r"docs/algorithm\.md §(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
CODE_REF = re.compile(r"`((?:qt|bench|configs|tests)/[\w/]+\.py|cli\.py):([\w.]+)`")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:  # not a git checkout
        pytest.skip(f"git ls-files failed ({err}): the grep needs a git checkout.")
    return [f for f in out.split("\0") if f and f != THIS]


def tracked_texts() -> dict[str, str]:
    texts = {}
    for name in tracked_files():
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        texts[name] = data.decode("utf-8", errors="replace")
    return texts


def sections() -> set[str]:
    return set(HEADING.findall((ROOT / "docs" / "algorithm.md").read_text()))


def test_the_patterns_catch_what_they_must_and_spare_what_they_must():
    assert OUTSIDE["an absolute /work/ path"].search("see /work/shared/x.md")
    assert OUTSIDE["an absolute /work/ path"].search("(/work/main/.venv)")
    assert not OUTSIDE["an absolute /work/ path"].search("data/work/hopper and <out>/../work/x")
    assert OUTSIDE["../shared"].search("`../shared/notes.md`")
    assert CITATION.findall("see docs/algorithm.md §3.1, and docs/algorithm.md §4.") == ["3.1", "4"]


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for name, text in tracked_texts().items():
        for lineno, line in enumerate(text.splitlines(), 1):
            for what, pattern in OUTSIDE.items():
                if pattern.search(line):
                    hits.append(f"{name}:{lineno}: {what}: {line.strip()[:100]}")
    assert not hits, "files point outside the repository:\n" + "\n".join(hits)


def test_algorithm_sections_are_numbered_in_order():
    found = HEADING.findall((ROOT / "docs" / "algorithm.md").read_text())
    top = [s for s in found if "." not in s]
    assert top == [str(i) for i in range(1, len(top) + 1)] and len(top) >= 7
    for sub in (s for s in found if "." in s):
        assert sub.split(".")[0] in top


def test_every_citation_names_an_existing_section():
    known = sections()
    bad, count = [], 0
    for name, text in tracked_texts().items():
        for lineno, line in enumerate(text.splitlines(), 1):
            for section in CITATION.findall(line):
                count += 1
                if section not in known:
                    bad.append(f"{name}:{lineno}: §{section}")
    assert count > 50  # the code, configs and tests cite it: the grep really ran
    assert not bad, f"citations of missing sections (have {sorted(known)}):\n" + "\n".join(bad)


def _names(path: Path) -> set[str]:
    """Top-level functions/classes/assignments of a Python file, and Class.method names."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(
                    f"{node.name}.{item.name}"
                    for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                )
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_function_and_test_a_document_names_exists(doc):
    text = doc.read_text()
    missing = []
    for file, name in CODE_REF.findall(text):
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
        elif name not in _names(path):
            missing.append(f"{file}:{name}")
    for file, name in TEST_REF.findall(text):
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
        elif name and name not in _names(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_their_anchors_resolve(doc):
    missing = []
    for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", doc.read_text()):
        path = doc.parent / target if target else doc
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            if anchor not in {_slug(h) for h in headings}:
                missing.append(f"{target}#{anchor}")
    assert not missing, f"{doc.name} links to what does not exist: {missing}"


def test_each_explanatory_document_has_its_diagram():
    for name in ("data", "training", "acting", "datagen"):
        text = (ROOT / "docs" / f"{name}.md").read_text()
        assert text.count("```mermaid") == 1, name


def test_the_readme_links_to_the_documents():
    readme = (ROOT / "README.md").read_text()
    for name in ("algorithm", "data", "training", "acting", "datagen", "baselines"):
        assert f"docs/{name}.md" in readme, name
