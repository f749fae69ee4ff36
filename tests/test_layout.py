"""The layout rules of docs/design.md that code can check: what each layer may import."""

import ast
import subprocess
import sys

from tests.helpers import ROOT

RUNTIME = sorted(p for p in (ROOT / "serving").rglob("*.py") if "exporters" not in p.parts)
BUILD_TIME = ("models", "pipelines", "app", "serving.exporters")


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_serving_runtime_imports_no_build_time_code():
    """The server, clients, batching and the edge runtime run where only TensorFlow is installed."""
    assert len(RUNTIME) >= 10
    for path in RUNTIME:
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ("models", "pipelines", "app")
                     or m.startswith("serving.exporters"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_loading_the_server_loads_no_build_time_module():
    code = ("import sys, serving.server, serving.client, serving.edge; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BUILD_TIME[:3]!r} "
            "or m.startswith('serving.exporters')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


PROJECT = ("app", "models", "pipelines", "serving", "bench", "tests", "examples")


def project_imports(folder: str) -> dict[str, list[str]]:
    """file -> the project modules it imports."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        mods = sorted(m for m in imported_modules(path) if m.split(".")[0] in PROJECT)
        out[str(path.relative_to(ROOT))] = mods
    return out


def test_models_import_nothing_of_the_project():
    """A model builder is reusable anywhere: no files, flags, workdirs or servers behind it."""
    imports = project_imports("models")
    assert len(imports) >= 6
    bad = {f: [m for m in mods if not m.startswith("models")] for f, mods in imports.items()}
    assert not any(bad.values()), bad


def test_pipelines_never_import_serving_or_the_command_line():
    imports = project_imports("pipelines")
    assert len(imports) >= 15
    outside = ("app", "serving", "bench", "tests")
    bad = {f: [m for m in mods if m.split(".")[0] in outside] for f, mods in imports.items()}
    assert not any(bad.values()), bad


def test_only_the_publish_helper_renames_directories_into_place():
    """Every stage publishes through pipelines.workdir (staging, mode, atomic rename, stale cleanup)."""
    calls = []
    for folder in ("app", "models", "pipelines", "serving"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "pipelines" / "workdir.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("rename", "replace") and \
                        getattr(node.value, "id", "") == "os":
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}: os.{node.attr}")
    assert not calls, calls


def test_no_import_cycles_among_project_modules():
    """Function-level imports count: a helper two modules share gets a module of its own (STYLE.md)."""
    modules = {}
    for folder in ("app", "models", "pipelines", "serving"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "__init__.py":  # packages re-export; they are not a module's dependency
                modules[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    graph = {m: {i for i in imported_modules(p) if i in modules and i != m} for m, p in modules.items()}
    assert len(graph) >= 60

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not cycles, f"modules that import each other, directly or through others: {cycles}"
