"""Imports run one way: engine (ctrl_core) <- steps (ctrl_core.steps) <- components/ and pipelines/.

Each layer is imported in a fresh interpreter and ``sys.modules`` is read afterwards: a layer that pulls in a
layer above it (or click/kfp into the engine, or torch into the modules that must stay light) fails, naming
the module whose import statement did it. Imports inside functions (the components' task bodies, the
engine's lazy imports) do not run on import, so every import statement is also read from the source.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the steps layer: the step functions and what serves a tuned model by them (ctrl_core.serving loads it as
# steps.evaluate does)
STEPS = ("ctrl_core.steps", "ctrl_core.serving")
ABOVE_ENGINE = (*STEPS, "components", "pipelines", "click", "kfp")
ABOVE_STEPS = ("components", "pipelines", "click", "kfp")
ABOVE_COMPONENTS = ("click", "pipelines")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


ENGINE = [_module_name(p) for p in _sources("ctrl_core") if _module_name(p) not in STEPS]
COMPONENTS = [_module_name(p) for p in _sources("components")]

# Run in a fresh interpreter: import the modules, and for every forbidden name record the first import of it
# with the project module (file:line) whose import statement caused it and, when a library did the importing,
# that library.
_CHILD = r"""
import importlib, json, sys

modules, forbidden = json.loads(sys.argv[1])
PROJECT = ("ctrl_core", "components", "pipelines")


def under(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


found = {p: "already imported at interpreter start" for p in forbidden if any(under(m, p) for m in sys.modules)}


def importer():
    project = via = None
    frame = sys._getframe(2)
    while frame is not None and project is None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")):
            if any(under(name, p) for p in PROJECT):
                project = f"{name} ({frame.f_code.co_filename}:{frame.f_lineno})"
            elif via is None and name != "__main__":
                via = name
        frame = frame.f_back
    return (project or "the test's own import") + (f" via {via}" if via else "")


class Watch:
    def find_spec(self, name, path=None, target=None):
        for p in forbidden:
            if p not in found and under(name, p):
                found[p] = f"{name}: imported by {importer()}"
        return None


sys.meta_path.insert(0, Watch())
for m in modules:
    importlib.import_module(m)
print(json.dumps(found))
"""


def imported_in_fresh_interpreter(modules: list[str], forbidden: tuple[str, ...]) -> dict[str, str]:
    """{forbidden prefix: which import pulled it in} after importing ``modules`` in a new interpreter."""
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([modules, list(forbidden)])], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, f"importing {modules} failed:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "modules, forbidden",
    [pytest.param(ENGINE, ABOVE_ENGINE, id="engine"),
     pytest.param(list(STEPS), ABOVE_STEPS, id="steps"),
     pytest.param(COMPONENTS, ABOVE_COMPONENTS, id="components")],
)  # fmt: skip
def test_a_layer_imports_nothing_above_it(modules, forbidden):
    found = imported_in_fresh_interpreter(modules, forbidden)
    assert not found, "\n".join(found.values())


TORCH_FREE = [
    pytest.param("ctrl_core", id="ctrl_core"),
    pytest.param("ctrl_core.rewards", id="ctrl_core.rewards"),
    pytest.param("ctrl_core.launch", id="ctrl_core.launch"),
    pytest.param("ctrl_core.config", id="ctrl_core.config"),
    pytest.param("ctrl_core.params", id="ctrl_core.params"),
    pytest.param("components", id="components"),
    pytest.param("pipelines.pipeline", id="pipelines.pipeline"),
]  # fmt: skip


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_modules_import_no_torch(module):
    """The reward registry, the launcher a component's task starts with, the config and the compile path
    must not pay for torch."""
    found = imported_in_fresh_interpreter([module], ("torch",))
    assert not found, f"{module}: {found['torch']}"


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, function bodies included
    (``from a import b`` counts as ``a`` and ``a.b``, as b may be a submodule)."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _layer(path: Path) -> tuple[str, ...]:
    name = _module_name(path)
    if name in STEPS:
        return ABOVE_STEPS
    return ABOVE_ENGINE if name.split(".")[0] == "ctrl_core" else ABOVE_COMPONENTS


SOURCES = [
    pytest.param(p, id=str(p.relative_to(ROOT)),
                 marks=[pytest.mark.xfail(strict=True, reason="the register task calls pipelines/register_step.py")]
                 if p.relative_to(ROOT).as_posix() == "components/register/component.py" else [])
    for p in _sources("ctrl_core") + _sources("components")
]  # fmt: skip


@pytest.mark.parametrize("path", SOURCES)
def test_no_import_statement_reaches_a_layer_above(path):
    """Also the imports that only run later: the engine's lazy ones, the components' task bodies (what a KFP
    task imports when it runs)."""
    forbidden = _layer(path)
    bad: dict[int, str] = {}  # line -> the first forbidden name it imports
    for line, name in imports_of(path):
        if any(name == p or name.startswith(p + ".") for p in forbidden):
            bad.setdefault(line, name)
    assert not bad, "\n".join(
        f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in sorted(bad.items())
    )
