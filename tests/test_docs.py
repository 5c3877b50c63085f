"""docs/problems.md: a heading per problem, every repository path it names exists, and the
README and docstrings point at it rather than at files outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "problems.md"
TOP = ("jaxdnn/", "experiments/", "tests/", "benchmarks/", "docs/")


def test_problems_doc_has_a_heading_per_problem():
    headings = [ln for ln in DOC.read_text().splitlines() if ln.startswith("## ")]
    for i in range(1, 7):
        assert any(h.startswith(f"## P{i}") for h in headings), f"no '## P{i}' heading"


def test_every_repository_path_in_the_doc_exists():
    text = DOC.read_text()
    named = {m.rstrip(".,:;)") for m in re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text)}
    paths = {n.split("::")[0].split("#")[0] for n in named if n.startswith(TOP)}
    assert paths, "the doc names no repository path"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_nothing_cites_files_outside_the_repository():
    files = [p for d in ("jaxdnn", "experiments", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    files.append(ROOT / "README.md")
    assert len(files) > 20
    offenders = [str(p.relative_to(ROOT)) for p in files if re.search(r"MISSION\.md|DESIGN\.md", p.read_text())]
    assert not offenders, offenders


def test_every_function_the_doc_names_exists():
    """On each line that names source files, every plain `identifier` is defined in one of them
    (a def, a class, an assignment or a quoted method name): a renamed function fails here."""
    missing = []
    for line in DOC.read_text().splitlines():
        files = [ROOT / p for p in re.findall(r"`([^`\s]+\.py)(?:::[^`]*)?`", line) if p.startswith(TOP)]
        if not files:
            continue
        text = "\n".join(f.read_text() for f in files if f.exists())
        for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", line):
            pattern = rf"\b(def|class)\s+{name}\b|^\s*{name}\s*[:=]|[\"']{name}[\"']"
            if not re.search(pattern, text, re.MULTILINE):
                missing.append(f"{name} ({', '.join(f.name for f in files)})")
    assert not missing, missing
