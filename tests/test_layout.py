"""The package layout keeps its promises: `serve` loads no tool, no layer below the data
path imports it, and only the command line (inside its commands) reaches the tools."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sidecar"
BELOW_THE_DATA_PATH = ("policy", "routing", "fleet", "scaler")


def module_level_imports(path: Path) -> list[str]:
    """Modules imported when `path` is imported (not inside functions or TYPE_CHECKING)."""
    names: list[str] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
    visit(ast.parse(path.read_text()).body)
    return names


def test_serve_loads_no_tool():
    code = ("import sys, sidecar.server, sidecar.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('sidecar.tools')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_layer_below_the_data_path_imports_it():
    offenders = [f"{path.relative_to(PACKAGE)}: {name}"
                 for folder in BELOW_THE_DATA_PATH
                 for path in sorted((PACKAGE / folder).rglob("*.py"))
                 for name in module_level_imports(path)
                 if name.startswith("sidecar.dataplane")]
    assert offenders == []


def test_only_tools_import_tools_when_loaded():
    offenders = [f"{path.relative_to(PACKAGE)}: {name}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 if "tools" not in path.relative_to(PACKAGE).parts
                 for name in module_level_imports(path)
                 if name.startswith("sidecar.tools")]
    assert offenders == []
