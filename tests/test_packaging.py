"""The clinic install must never pull torch (DESIGN: `pip install .` is the clinic install)."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_runtime_modules_do_not_import_torch():
    for path in (ROOT / "edge_runtime").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text, f"{path} imports torch"
