"""The repository stands on its own: no reference to documents outside it, no import cycle in depthg/."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Developer-only documents that a clone of the repository does not have. ``method.md`` is fine inside
# docs/ (a link to docs/method.md); everywhere else it must be spelled docs/method.md.
OUTSIDE = re.compile(r"\.\./shared|(?<![\w/-])(released_code|design|ecosystem)\.md")
BARE_METHOD = re.compile(r"(?<![\w/-])method\.md")
# Files whose own checks use such names as test data.
ALLOWED = {"tests/test_notebooks.py", "tests/test_repository.py"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if line.endswith((".py", ".ipynb", ".md", ".txt", ".yml",
                                                                       ".yaml", ".toml", ".sh", ".cfg"))]


def test_no_reference_to_documents_outside_the_repository():
    hits = []
    for path in tracked_files():
        if not path.is_file():
            continue
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if OUTSIDE.search(line) or (not rel.startswith("docs/") and BARE_METHOD.search(line)):
                hits.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not hits, "cite docs/ instead:\n" + "\n".join(hits)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """depthg modules that ``path`` imports anywhere (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return (found & modules) - {name}


def test_no_import_cycles_in_depthg():
    paths = sorted((ROOT / "depthg").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(p, modules) for p in paths}

    # a cycle exists iff some module reaches itself; report the first one found
    def path_back(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [" -> ".join(c) for m in sorted(graph) if (c := path_back(m)) is not None]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cycle_detector_sees_a_cycle(tmp_path, monkeypatch):
    """The checker above is not vacuous: two modules importing each other are reported."""
    pkg = tmp_path / "depthg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from depthg import b\n")
    (pkg / "b.py").write_text("def f():\n    from depthg.a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="depthg.a -> depthg.b -> depthg.a"):
        test_no_import_cycles_in_depthg()


def test_reference_patterns_catch_what_they_should():
    assert OUTSIDE.search("see released_code.md §2.4") and OUTSIDE.search("(design.md, Conventions)")
    assert OUTSIDE.search("`../shared/reference/` in the development checkout")
    assert OUTSIDE.search("ecosystem.md §3") and BARE_METHOD.search("(method.md §5.3)")
    assert not BARE_METHOD.search("docs/method.md §8.3")
    assert not OUTSIDE.search("docs/fidelity.md §3.3 and docs/released_golden.md")
