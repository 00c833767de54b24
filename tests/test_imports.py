"""Import hygiene: the registry is light to import, and the layers import only what they may."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("open_clip", "transformers", "timm", "torchvision")


def _modules_after(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    return set(result.stdout.split())


def test_importing_the_registry_pulls_in_no_heavy_library():
    loaded = _modules_after("import llavakit.registry")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert "torch" not in loaded  # public names resolve lazily


def test_discovering_plugins_does_not_import_open_clip_or_transformers():
    loaded = _modules_after("from llavakit.registry import get_registry\nget_registry()")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layering_rules_hold_in_every_file():
    problems = []
    for folder, forbidden in (
        ("core", ("llavakit.plugins", "llavakit.registry", "transformers")),
        ("plugins", ("llavakit.registry", "transformers")),
        ("registry", ("transformers",)),
    ):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imports(path):
                if name.startswith(forbidden) or name.split(".")[0] in ("core", "plugins", "registry"):
                    problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not problems, "\n".join(problems)
