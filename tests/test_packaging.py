"""The clinic install must never pull torch (DESIGN: `pip install .` is the clinic install)."""

import ast
import configparser
import json
import subprocess
import sys
from pathlib import Path

from .conftest import BLOCK_TORCH, edge_run

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("edge_runtime", "export", "quantize", "federation", "server")
NOT_IN_CLINIC = ("export", "quantize", "server")  # the `export` (torch) and `server` extras' side


def _cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_base_requirements_have_no_torch():
    base = [line.strip() for line in _cfg()["options"]["install_requires"].splitlines() if line.strip()]
    assert base and not any(r.lower().startswith(("torch", "onnxscript")) for r in base)
    assert any(r.startswith("cryptography>=50") for r in base)


def test_export_extra_pins_cpu_torch():
    extra = _cfg()["options.extras_require"]["export"]
    assert "torch==2.13.0" in extra


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> list[str]:
    """Every module ``path`` imports, anywhere in it (late imports inside functions too), with
    relative imports resolved; ``importlib.import_module("x")`` and ``__import__("x")`` included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append(node.args[0].value)
    return found


def clinic_modules() -> dict[str, list[str]]:
    """Every module of ours the clinic can reach from edge_runtime (imports followed transitively),
    with what each imports."""
    todo = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "edge_runtime").rglob("*.py"))
    seen: dict[str, list[str]] = {}
    while todo:
        module = todo.pop()
        path = _module_path(module)
        if module in seen or path is None:
            continue
        seen[module] = _imports(path, module)
        todo += [m for m in seen[module] if m.split(".")[0] in OUR_PACKAGES and m not in seen]
    return seen


def test_no_clinic_module_imports_torch():
    modules = clinic_modules()
    assert "edge_runtime.cli" in modules and "edge_runtime.measure" in modules and len(modules) > 20
    for module, imports in modules.items():
        torch = [m for m in imports if m == "torch" or m.startswith("torch.")]
        assert not torch, f"{module} imports {torch[0]}"
        export_side = [m for m in imports if m.split(".")[0] in NOT_IN_CLINIC]
        assert not export_side, f"{module} imports {export_side[0]}, which is not in the clinic install"


def test_import_walk_sees_every_way_of_importing(tmp_path):
    """The walk above would catch each of these (a check that cannot fail checks nothing)."""
    for line in ("import torch", "from torch import nn", "import torch.nn as nn", "importlib.import_module('torch')",
                 "__import__('torch.nn')", "def late():\n    from torch import nn"):
        path = tmp_path / "m.py"
        path.write_text(line + "\n")
        assert any(m.split(".")[0] == "torch" for m in _imports(path, "edge_runtime.m")), line
    (tmp_path / "r.py").write_text("from ..export import stages\nfrom . import measure\n")
    assert {"edge_runtime.export", "edge_runtime.export.stages", "edge_runtime.finetune.measure"} \
        <= set(_imports(tmp_path / "r.py", "edge_runtime.finetune.r"))


# Imports every clinic module with torch made unimportable (conftest.BLOCK_TORCH, as for the CLIs)
# and reports whether anything, ours or a dependency's, loaded torch anyway.
IMPORT_ALL = BLOCK_TORCH + """
import importlib, json
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
print(json.dumps({"failed": failed, "torch": sorted(m for m in sys.modules if m.split('.')[0] == 'torch')}))
"""


def test_every_clinic_module_imports_with_torch_blocked():
    names = sorted(m for m in clinic_modules() if m.split(".")[0] == "edge_runtime" and not m.endswith("__main__"))
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(names)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"failed": {}, "torch": []}


def test_every_clinic_command_runs_with_torch_blocked():
    from edge_runtime.cli import main

    commands = sorted(main.commands)
    assert {"infer", "profile", "finetune", "sync", "doctor", "status"} <= set(commands)
    for command in ["", *commands]:
        proc = edge_run(*([command] if command else []), "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, (command, proc.stderr)
    # A command that does work, without a bundle: no torch on its way to the refusal either.
    proc = edge_run("infer", "--bundle", "no-such-bundle", "--synthetic", "--case-id", "1")
    assert proc.returncode == 2 and "torch" not in proc.stderr, proc.stderr
