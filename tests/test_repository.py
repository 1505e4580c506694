"""The repository stands on its own (no reference to documents outside it) and its layout holds: no import
cycle in depthg/, the method in depthg/method imports nothing of the run, no function over 80 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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


# ----------------------------------------------------------------------------------------------------
# the layout: the method stands alone, functions stay short
# ----------------------------------------------------------------------------------------------------
#: what depthg/method may import besides the standard library (docs/architecture.md)
METHOD_MAY_IMPORT = ("torch", "numpy", "numba", "depthg.utils", "depthg.method")


def method_imports(path: Path) -> set[str]:
    """Every module a file of depthg/method imports (absolute names; relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])) or node.module or "")
    return found


def test_the_method_imports_only_torch_numpy_the_stdlib_and_utils():
    allowed = set(sys.stdlib_module_names)
    bad = []
    for path in sorted((ROOT / "depthg" / "method").glob("*.py")):
        for name in sorted(method_imports(path)):
            top = name.split(".")[0]
            if top in allowed or top == "__future__" or any(name == m or name.startswith(m + ".") for m in METHOD_MAY_IMPORT):
                continue
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "depthg/method must stand alone:\n" + "\n".join(bad)


def test_importing_the_method_loads_nothing_of_the_run():
    code = ("import sys, depthg.method\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'scipy', 'timm', 'PIL', 'transformers')"
            " or (m.startswith('depthg.') and not m.startswith(('depthg.method', 'depthg.utils')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing depthg.method loaded: {out.strip()}"


def test_the_method_checker_sees_a_run_import(tmp_path, monkeypatch):
    (tmp_path / "depthg" / "method").mkdir(parents=True)
    (tmp_path / "depthg" / "method" / "losses.py").write_text("import yaml\nfrom depthg.config import Config\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports depthg.config"):
        test_the_method_imports_only_torch_numpy_the_stdlib_and_utils()


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted((ROOT / "depthg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - first + 1} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)
