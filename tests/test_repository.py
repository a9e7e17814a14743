"""Rules for the repository as a whole: no import cycle among the project's packages (module-level
and function-level imports alike), the method importable without data or application code,
nothing outside tests/ pointing outside the repository or at this project's issue tracker, small
modules and functions, and a README whose layout section matches the tree."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pathoscope", "data_modules", "callbacks")
MAX_LINES = 500
# Never part of a checkout's content (what .gitignore lists, plus caches and environments).
IGNORED_PARTS = {
    ".git",
    "runs",
    "data",
    "lightning_logs",
    "wandb",
    "build",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
}


# ------------------------------------------------------------------------------- files
def repository_files() -> list[Path]:
    """The checkout's files (relative): git's tracked and unignored ones, else a filtered walk."""
    try:
        proc = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        files = [Path(line) for line in proc.stdout.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file()]
    return sorted(
        f
        for f in files
        if (REPO / f).is_file()
        and not IGNORED_PARTS & set(f.parts)
        and not any(part.startswith(".venv") or part.endswith(".egg-info") for part in f.parts)
    )


def _text(path: Path) -> str | None:
    try:
        return (REPO / path).read_text(encoding="utf-8")
    except UnicodeDecodeError:  # binary files say nothing here
        return None


# ------------------------------------------------------------------------------- imports
def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages."""
    modules = {}
    for f in repository_files():
        if f.suffix == ".py" and f.parts[0] in PACKAGES:
            parts = list(f.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = f
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (inside functions too)."""
    tree = ast.parse((REPO / path).read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module path
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_of(name: str, modules: dict[str, Path]) -> str:
    """The (sub)package a module belongs to: pathoscope.app.bench.run -> pathoscope.app.bench."""
    return name if modules[name].name == "__init__.py" else name.rpartition(".")[0]


def test_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "pathoscope.app.lightning_cli" in graph["pathoscope.app.cli"]  # imported lazily
    assert "pathoscope.torch_model" in graph["pathoscope.lightning_model"]


def test_no_import_cycle_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages() -> None:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        source = package_of(name, modules)
        graph.setdefault(source, set()).update(
            package_of(t, modules) for t in targets if package_of(t, modules) != source
        )
    assert cycles(graph) == []


def test_the_method_imports_no_data_or_application_code() -> None:
    """pathoscope/ itself (outside pathoscope/app) needs neither data_modules nor callbacks."""
    for name, targets in import_graph().items():
        if name.startswith("pathoscope") and not name.startswith("pathoscope.app"):
            wrong = sorted(t for t in targets if not t.startswith("pathoscope") or ".app" in t)
            assert wrong == [], name


# ------------------------------------------------------------------------------- content
OUTSIDE = re.compile(r"\.\./shared")
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)


def test_nothing_outside_tests_points_outside_the_repository() -> None:
    offenders = []
    for f in repository_files():
        if f.parts[0] == "tests" or (text := _text(f)) is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) or ISSUE_NUMBER.search(line):
                offenders.append(f"{f}:{i}: {line.strip()}")
    assert offenders == []


def test_every_module_outside_tests_is_small() -> None:
    sizes = {
        str(f): len((REPO / f).read_text().splitlines())
        for f in repository_files()
        if f.suffix == ".py" and f.parts[0] != "tests"
    }
    assert sizes and {f: n for f, n in sizes.items() if n >= MAX_LINES} == {}


# ------------------------------------------------------------------------------- functions
MAX_FUNCTION_LINES = 60  # docstring not counted


def function_lengths(source: str) -> dict[str, int]:
    """Qualified name (Class.method, outer.inner) -> lines of every function of `source`, from
    `def` to its last line, its docstring not counted."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                assert child.end_lineno is not None
                lines = child.end_lineno - child.lineno + 1
                first = child.body[0]
                if (
                    isinstance(first, ast.Expr)
                    and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)
                ):
                    assert first.end_lineno is not None
                    lines -= first.end_lineno - first.lineno + 1
                lengths[name] = lines
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def test_function_lengths_leave_out_the_docstring() -> None:
    source = (
        "class A:\n"
        "    def f(self):\n"
        '        """One.\n\n        Two.\n        """\n'
        "        def g():\n"
        "            return 1\n"
        "        return g()\n"
        "async def h(): pass\n"
    )
    assert function_lengths(source) == {"A.f": 4, "A.f.g": 2, "h": 1}


def test_no_function_outside_tests_is_long() -> None:
    long_ones = {}
    for f in repository_files():
        if f.suffix == ".py" and f.parts[0] != "tests":
            for name, lines in function_lengths((REPO / f).read_text()).items():
                if lines > MAX_FUNCTION_LINES:
                    long_ones[(f.as_posix(), name)] = lines
    assert long_ones == {}, f"functions over {MAX_FUNCTION_LINES} lines (docstring not counted)"


# ------------------------------------------------------------------------------- README
# Folders whose every file the README's layout must list (the rest list their main entries).
LISTED_IN_FULL = ("pathoscope", "data_modules", "callbacks", "docs", "benchmarks", "scripts")


def readme_layout() -> list[str]:
    """Paths of the README's "## Layout" code block: one entry per line, two spaces per level,
    folders ending in "/"."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md needs a '## Layout' section with a code block"
    paths: list[str] = []
    stack: list[str] = []
    for line in match.group(1).splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        entry = line.split()[0]
        stack = stack[:depth]
        assert len(stack) == depth, f"README layout: bad indentation at {line!r}"
        paths.append("".join(stack) + entry)
        if entry.endswith("/"):
            stack.append(entry)
    return paths


def test_readme_layout_matches_the_tree() -> None:
    listed = readme_layout()
    missing = [p for p in listed if not (REPO / p).exists()]
    assert missing == [], "README lists paths that do not exist"
    files = repository_files()
    top = {f.parts[0] + ("/" if len(f.parts) > 1 else "") for f in files}
    top = {t for t in top if not t.startswith(".")}
    assert sorted(top - set(listed)) == [], "top-level entries missing from the README layout"
    for folder in LISTED_IN_FULL:
        expected = {
            f.as_posix()
            for f in files
            if f.parts[0] == folder and f.name not in ("__init__.py", "__main__.py")
        }
        unlisted = sorted(expected - set(listed))
        assert unlisted == [], f"{folder}/ files missing from the README layout"


@pytest.mark.parametrize("folder", ["tests/", "benchmarks/", "docs/"])
def test_readme_layout_names_tests_benchmarks_and_docs(folder: str) -> None:
    assert folder in readme_layout()
