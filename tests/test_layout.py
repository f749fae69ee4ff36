"""The layout rules of DESIGN.md that code can check: what the serving runtime may import."""

import ast
import subprocess
import sys

from tests.conftest import ROOT

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
