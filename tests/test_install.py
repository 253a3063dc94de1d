"""Packaging: the core works without the pipeline's packages, the ``freekd`` command without the
``pipeline`` extra says what to install, the recipes ship inside the package (``freekd configs``,
``-c recipe:NAME``), ``freekd --version``.

The core-only runs use ``tests/core_only_check.py``: in the default suite under ``python -S`` on
a copy of this environment's site-packages without the pipeline's packages (symbolic links to
everything else), and as a slow test in a fresh venv where ``pip install`` brought only the core's
dependencies. Either way its numbers must equal those of the full environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from freekd._version import __version__
from freekd.cli import app
from tests.core_only_check import PIPELINE

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "core_only_check.py"
RECIPES = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
PIP_INSTALL_HINT = "pip install 'freekd[pipeline]'"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run_check(python: list[str], output: Path, **env: str) -> dict:
    result = subprocess.run(
        [*python, str(CHECK), str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(**env),
        cwd=output.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def full_environment_numbers(tmp_path_factory) -> dict:
    """The core check's numbers in this (full) environment."""
    return _run_check([sys.executable], tmp_path_factory.mktemp("full") / "out")


@pytest.fixture(scope="module")
def core_only_site(tmp_path_factory) -> Path:
    """A folder of links to this environment's site-packages, less the pipeline's packages,
    their ``.pth`` files and the editable freekd (``src/`` goes on ``PYTHONPATH`` instead)."""
    site = Path(torch.__file__).resolve().parents[1]
    filtered = tmp_path_factory.mktemp("core-only") / "site-packages"
    filtered.mkdir()
    left_out = {*PIPELINE, "_yaml", "freekd"}
    for entry in site.iterdir():
        module = entry.name.split(".")[0]
        if module in left_out or entry.suffix == ".pth" or module.startswith("__editable__"):
            continue
        (filtered / entry.name).symlink_to(entry)
    return filtered


def _results(numbers: dict) -> dict:
    """The check's results, less what it says about the installed packages."""
    return {k: v for k, v in numbers.items() if not k.startswith("pipeline")}


def _core_only(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{site}"}


# ---------------------------------------------------------------------------- the core alone


def test_the_core_works_without_the_pipeline_packages(
    core_only_site, full_environment_numbers, tmp_path
):
    numbers = _run_check([sys.executable, "-S"], tmp_path / "out", **_core_only(core_only_site))
    assert numbers["pipeline_modules_installed"] == []  # they really are absent there
    assert numbers["pipeline_modules_imported"] == []
    assert numbers["prompts_reloaded_equal"] and numbers["student_reloaded_equal"]
    assert numbers["official"] == [6, 2]
    assert numbers["tuning_loss"] > 0 and numbers["calibrated_weight"] > 0
    assert _results(numbers) == _results(full_environment_numbers)  # bit for bit
    assert full_environment_numbers["pipeline_modules_imported"] == []


def test_the_command_without_the_pipeline_extra_prints_one_line(core_only_site, tmp_path):
    def freekd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-S", "-m", "freekd", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(**_core_only(core_only_site)),
            cwd=tmp_path,
        )

    for args in (["demo", "--quick"], ["--help"], []):
        result = freekd(*args)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and PIP_INSTALL_HINT in lines[0], result.stderr
        assert "typer" in lines[0] and "lightning" in lines[0]  # names what is missing
    version = freekd("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"freekd {__version__}")


def test_the_package_metadata_separates_core_and_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ;]", dep)[0].lower() for dep in project["dependencies"]]
    assert names == ["torch", "torchvision", "safetensors"]
    extras = project["optional-dependencies"]
    pipeline = {re.split(r"[<>=\[ ;]", dep)[0].lower() for dep in extras["pipeline"]}
    assert {"lightning", "timm", "segmentation-models-pytorch", "pycocotools", "scikit-learn"} <= (
        pipeline
    )
    assert {"typer", "pyyaml", "numpy", "pillow"} <= pipeline
    assert "freekd[pipeline]" in extras["dev"]
    assert project["scripts"]["freekd"] == "freekd.__main__:main"


# ---------------------------------------------------------------------------- --version


def test_version_alone():
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.output.strip()) == (0, f"freekd {__version__}")
    installed = Path(sys.executable).parent / "freekd"  # the console script pip wrote
    commands = [
        [sys.executable, "-m", "freekd"],
        *([[str(installed)]] if installed.is_file() else []),
    ]
    for command in commands:
        script = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=120, env=_env()
        )
        assert (script.returncode, script.stdout.strip()) == (0, f"freekd {__version__}"), command


# ---------------------------------------------------------------------------- recipes


def test_the_packaged_recipes_are_the_repository_configs():
    from freekd._recipes import recipe_dir, recipe_names

    assert recipe_dir().resolve() == (ROOT / "configs").resolve()  # one folder, two names
    assert recipe_names() == RECIPES and len(RECIPES) >= 13


def test_configs_list_show_copy(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(app, ["configs", "list"])
    assert listing.exit_code == 0
    rows = listing.output.strip().splitlines()
    assert [row.split()[0] for row in rows] == RECIPES
    for name, row in zip(RECIPES, rows, strict=True):
        description = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["description"]
        assert row.split(None, 1)[1] == " ".join(description.split())

    name = "digits_demo_segmentation"
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    shown = runner.invoke(app, ["configs", "show", name])
    assert (shown.exit_code, shown.output) == (0, text)

    folder = tmp_path / "mine"
    copied = runner.invoke(app, ["configs", "copy", name, f"{folder}/"])
    assert copied.exit_code == 0, copied.output
    assert (folder / f"{name}.yaml").read_text() == text
    again = runner.invoke(app, ["configs", "copy", name, str(folder / f"{name}.yaml")])
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    forced = runner.invoke(app, ["configs", "copy", name, str(folder / f"{name}.yaml"), "--force"])
    assert forced.exit_code == 0


def test_an_unknown_recipe_is_one_line_with_a_hint():
    for args in (
        ["configs", "show", "digits_demo_segmentaton"],
        ["distill", "-c", "recipe:digits_demo_segmentaton"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "did you mean 'digits_demo_segmentation'" in lines[0]
        assert "freekd configs list" in lines[0]


def test_recipe_name_in_place_of_a_config_file(tmp_path):
    from freekd.cli import _load
    from freekd.pipeline.config import load_config

    for name in RECIPES:
        by_name = _load(Path(f"recipe:{name}"), ["seed=3"], tmp_path, None)
        by_file = load_config(ROOT / "configs" / f"{name}.yaml", ["seed=3", f"run_dir={tmp_path}"])
        assert by_name == by_file
    # and through a command: the recipe loads, then the job asks for its missing input
    result = CliRunner().invoke(
        app, ["export", "-c", "recipe:digits_demo_segmentation", "-o", str(tmp_path / "run")]
    )
    assert result.exit_code == 2 and "run freekd distill first" in result.output, result.output


def test_the_wheel_holds_the_recipes_and_the_entry_point(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("freekd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).stem for n in names if n.startswith("freekd/recipes/")) == sorted(
        [*RECIPES, "README"]
    )
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "freekd = freekd.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_no_recipe_cites_a_file_outside_the_repository():
    for path in (ROOT / "configs").iterdir():
        for cited in re.findall(r"\b([\w/.-]+\.md)\b", path.read_text()):
            assert (ROOT / cited).is_file() or (path.parent / cited).is_file(), (path, cited)


def test_the_recipe_module_docstring_examples_run():
    import doctest

    import freekd._recipes

    result = doctest.testmod(freekd._recipes, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------- fresh venv (slow)


@pytest.mark.slow
def test_pip_install_of_the_core_alone_in_a_fresh_venv(tmp_path, full_environment_numbers):
    """``pip install freekd`` in a new venv brings torch, torchvision and safetensors (and their
    own dependencies) only; the core then runs as in the full environment."""
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    pins = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={__import__('torchvision').__version__.split('+')[0]}",
    ]

    def pip(*args: str) -> str:
        result = subprocess.run(
            [str(python), "-m", "pip", *args], capture_output=True, text=True, env=_env()
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    pip("install", "-q", *pins, "safetensors")
    pip("install", "-q", str(ROOT))  # with its dependencies: nothing more than the core's
    installed = {re.split(r"==| @ ", line)[0].lower() for line in pip("freeze").splitlines()}
    assert "freekd" in installed
    for name in ("lightning", "timm", "segmentation-models-pytorch", "pycocotools", "typer"):
        assert name not in installed, f"pip install freekd installed {name}"
    assert not {"scikit-learn", "pyyaml", "pywavelets"} & installed

    numbers = _run_check([str(python)], tmp_path / "out")
    assert numbers["pipeline_modules_installed"] == []
    assert numbers["pipeline_modules_imported"] == []
    assert _results(numbers) == _results(full_environment_numbers)

    script = subprocess.run(
        [str(environment / "bin" / "freekd"), "demo"], capture_output=True, text=True, env=_env()
    )
    lines = script.stderr.strip().splitlines()
    assert script.returncode == 2 and len(lines) == 1 and PIP_INSTALL_HINT in lines[0]
