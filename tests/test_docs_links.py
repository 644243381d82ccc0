"""Every document the repository cites is in the repository.

Code, configs and docs cite the specification, the design and the paper's facts as ``docs/spec.md §3.5``,
``docs/paper_facts.md §1`` and the like. A tracked ``.py``, ``.md``, ``.yaml`` or ``.toml`` file fails here when
it names a document kept outside the repository (the working notes the project started from), names a
``docs/*.md`` file that does not exist, links a relative path that does not exist (Markdown links in
``README.md`` and ``docs/``), or cites a section (``§3.5``, ``§1-2``, ``section 3``) that the Markdown file
it names does not have. Sections are ``## N.`` headings and, inside section N, ``### N.M`` headings or
numbered items ``M.`` at the start of a line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml")

# Documents that live outside the repository. The names are split so that this file does not cite them.
OUTSIDE = re.compile(
    "|".join(
        [
            "TAD_" + "SPEC",
            "PAPER_" + "FACTS",
            r"\bDESIGN" + r"\.md",  # upper case: the old design notes (ours is docs/design.md)
            r"(?<!docs/)\bpeers" + r"\.md",
            r"shared/(?:docs|research|paper)/",  # ../shared/assets (test data CI has) is allowed
        ]
    )
)
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*?\.md\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
SECTION_REF = re.compile(
    r"(?P<path>[\w./-]*\.md)`?(?:\]\([^)\s]*\))?`?,?[ \t]*(?:§[ \t]*|section[ \t]+)"
    r"(?P<ids>\d+(?:\.\d+)?(?:[ \t]*[-,][ \t]*§?[ \t]*\d+(?:\.\d+)?)*)"
)


def _tracked_files() -> list[Path]:
    """The repository's files of the checked kinds: ``git ls-files``, or a walk of the tree without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {"build", "dist", "node_modules"}
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part in skip for part in p.relative_to(REPO).parts)
        ]
    return sorted(REPO / n for n in names if n.endswith(SUFFIXES) and (REPO / n).is_file())


def _sections(markdown: str) -> set[str]:
    """Section ids of a Markdown file: ``N`` for ``## N.`` headings, ``N.M`` for ``### N.M`` headings and for
    numbered items ``M.`` inside section N."""
    ids: set[str] = set()
    current = None
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if m := re.match(r"^##\s+(\d+)\.", line):
            current = m.group(1)
            ids.add(current)
        elif m := re.match(r"^###\s+(\d+\.\d+)\b", line):
            ids.add(m.group(1))
        elif current is not None and (m := re.match(r"^(\d+)\.\s", line)):
            ids.add(f"{current}.{m.group(1)}")
    return ids


def _resolve(path: str, citing: Path, root: Path) -> Path | None:
    """A cited Markdown path: relative to the citing file's folder, the repository root, or ``docs/``."""
    for base in (citing.parent, root, root / "docs"):
        candidate = (base / path).resolve()
        if candidate.is_file():
            return candidate
    return None


def problems_in(text: str, citing: Path, root: Path = REPO) -> list[str]:
    """Every broken citation in ``text`` (the contents of ``citing``), as ``line N: what``."""
    found = []
    for no, line in enumerate(text.splitlines(), start=1):
        for m in OUTSIDE.finditer(line):
            found.append(f"line {no}: {m.group(0)!r} is not in the repository; cite docs/spec.md, docs/design.md "
                         "or docs/paper_facts.md (or name the public source)")  # fmt: skip
        for m in DOCS_PATH.finditer(line):
            if not (root / m.group(0)).is_file():
                found.append(f"line {no}: {m.group(0)} does not exist")
        if citing.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target = m.group(1).split("#", 1)[0]
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # anchors, URLs, mailto:
                    continue
                if not (citing.parent / target).exists():
                    found.append(f"line {no}: link target {m.group(1)!r} does not exist")
        for m in SECTION_REF.finditer(line):
            doc = _resolve(m.group("path"), citing, root)
            if doc is None:
                found.append(f"line {no}: {m.group('path')} (cited with a section) does not exist")
                continue
            have = _sections(doc.read_text(encoding="utf-8"))
            for ref in re.split(r"[-,]", m.group("ids")):
                ref = ref.strip().lstrip("§").strip()
                if ref not in have:
                    found.append(
                        f"line {no}: {m.group('path')} has no section {ref} (it has {', '.join(sorted(have))})"
                    )
    return found


@pytest.fixture(scope="module")
def report() -> dict[str, list[str]]:
    out = {}
    for path in _tracked_files():
        if path == Path(__file__).resolve():
            continue
        found = problems_in(path.read_text(encoding="utf-8", errors="replace"), path)
        if found:
            out[str(path.relative_to(REPO))] = found
    return out


def test_every_cited_document_and_section_is_in_the_repository(report):
    lines = [f"{name}: {p}" for name, found in report.items() for p in found]
    assert not lines, "broken document citations:\n" + "\n".join(lines)


def test_the_documents_the_code_cites_exist():
    for name in ("spec.md", "design.md", "paper_facts.md"):
        assert (REPO / "docs" / name).is_file(), f"docs/{name} is missing"
    spec = _sections((REPO / "docs" / "spec.md").read_text(encoding="utf-8"))
    # the sections code and docs cite, numbered like the original specification
    assert {"1", "2", "3", "4", "5", "3.1", "3.4", "3.5", "3.6", "3.7", "3.8"} <= spec


def test_checker_catches_each_kind_of_broken_citation(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "spec.md").write_text("# Spec\n## 1. One\n## 3. Three\n1. first\n2. second\n```\n## 9. in code\n```\n")
    (docs / "img.png").write_bytes(b"")
    code = tmp_path / "pkg" / "mod.py"
    code.parent.mkdir()
    good = "see docs/spec.md §3.2, docs/spec.md §1, (`docs/spec.md` §3.1-3.2) and docs/spec.md section 3\n"
    assert problems_in(good, code, tmp_path) == []
    assert problems_in("[spec](spec.md) §1 and ![x](img.png)\n", docs / "page.md", tmp_path) == []
    bad = {
        "TAD_" + "SPEC §3.5": "is not in the repository",
        "PAPER_" + "FACTS.md": "is not in the repository",
        "DESIGN" + ".md, Boundaries": "is not in the repository",
        "peers" + ".md §14.4": "is not in the repository",
        "../shared/" + "research/style_guide.md": "is not in the repository",
        "docs/missing.md": "docs/missing.md does not exist",
        "docs/spec.md §2": "has no section 2",
        "docs/spec.md §3.3": "has no section 3.3",
        "docs/spec.md §1-2": "has no section 2",
        "docs/spec.md §9": "has no section 9",  # a heading inside a code block is not a section
        "docs/spec.md section 4": "has no section 4",
    }
    for text, why in bad.items():
        found = problems_in(text + "\n", code, tmp_path)
        assert any(why in p for p in found), (text, found)
    found = problems_in("[gone](gone.md) and [ok](spec.md#one)\n", docs / "page.md", tmp_path)
    assert len(found) == 1 and "'gone.md' does not exist" in found[0]
    assert problems_in("../shared/assets/tokenizers and https://arxiv.org/abs/2602.20816\n", code, tmp_path) == []
