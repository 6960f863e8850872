"""The package boundaries DEVELOPERS.md sets: byol_core never imports worker or service, the
service never imports torch, and the spec is usable without torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_byol_core_imports_neither_worker_nor_service():
    for path, names in imported_modules("byol_core").items():
        assert not names & {"worker", "service"}, path


def test_service_never_imports_torch():
    for path, names in imported_modules("service").items():
        assert not names & {"torch", "torchvision"}, path


def test_spec_and_presets_load_without_torch():
    code = (
        "import sys, byol_core.presets as p; p.resolve_spec(variant='no_norm');"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
