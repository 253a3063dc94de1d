"""The public surface: exactly what ``freekd`` exports, that each name imports, that every module
says what it exports (``__all__``), and one spelling (American, as torch) in public names."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import freekd

PUBLIC = [
    "ChannelWiseDistillation",
    "DWT2d",
    "Distiller",
    "FeatureMSE",
    "FeatureTaps",
    "FreeKDLoss",
    "FrequencyL1",
    "FrequencyPrompt",
    "IDWT2d",
    "LayerwiseLoss",
    "MaskedGenerativeDistillation",
    "NonFiniteError",
    "OutputLoss",
    "PromptTuner",
    "RelationalGate",
    "TapError",
    "__version__",
    "auto_levels",
    "build_loss",
    "calibrate_weight",
    "dwt2",
    "export_student",
    "idwt2",
    "load_weights",
    "loss_names",
    "probe_features",
    "register_loss",
]

BRITISH = re.compile(r"normalis|colour|optimis|visualis|initialis|centre|summaris|distil(?!l)")


OPTIONAL = {"freekd.integrations.ultralytics": "ultralytics"}
"""Subpackages that need an extra: ``{package: the module it needs}``."""


def _modules() -> list[str]:
    """Every freekd module, less those whose extra is not installed."""
    names = ["freekd"]
    for info in pkgutil.walk_packages(freekd.__path__, "freekd.", onerror=lambda name: None):
        needs = [m for p, m in OPTIONAL.items() if info.name == p or info.name.startswith(p + ".")]
        if all(importlib.util.find_spec(m) is not None for m in needs):
            names.append(info.name)
    return names


def test_the_top_level_exports_exactly_these_names():
    assert sorted(freekd.__all__) == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_name_imports(name):
    namespace: dict[str, object] = {}
    exec(f"from freekd import {name}", namespace)  # noqa: S102 - the import statement itself
    assert namespace[name] is getattr(freekd, name)


def test_the_version_is_the_package_version():
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    version = re.search(r'(?m)^version = "([^"]+)"$', pyproject.read_text()).group(1)
    assert freekd.__version__ == version
    from freekd._version import __version__

    assert __version__ is freekd.__version__


def test_every_module_names_its_exports_and_they_exist():
    for name in _modules():
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it lacks: {missing}"
        assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"


def test_public_names_use_american_spelling():
    british = [
        f"{name}.{export}"
        for name in _modules()
        for export in importlib.import_module(name).__all__
        if BRITISH.search(export.lower())
    ]
    assert not british, f"British spelling in public names: {british}"
