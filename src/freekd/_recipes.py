"""The YAML recipes shipped inside the package (``freekd/recipes/*.yaml``; the repository's
``configs/`` is the same folder), found by name.

``recipe:NAME`` stands for the shipped recipe ``NAME`` wherever the command line takes a
configuration file (``freekd distill -c recipe:digits_demo_segmentation``). Standard library only:
listing and printing recipes imports nothing of the pipeline.

Example:
    >>> "digits_demo_segmentation" in recipe_names()
    True
    >>> resolve_config("recipe:digits_demo_segmentation").name
    'digits_demo_segmentation.yaml'
    >>> str(resolve_config("my.yaml"))
    'my.yaml'
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ._checks import did_you_mean, preview

__all__ = [
    "RECIPE_PREFIX",
    "copy_recipe",
    "recipe_dir",
    "recipe_names",
    "recipe_path",
    "recipe_summary",
    "resolve_config",
]

RECIPE_PREFIX = "recipe:"


def recipe_dir() -> Path:
    """The folder of the shipped recipes (``<site-packages>/freekd/recipes``)."""
    return Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    """The names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in recipe_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of the shipped recipe ``name`` (``"digits_demo_segmentation"``; a trailing
    ``.yaml`` is accepted).

    Raises:
        FileNotFoundError: no recipe of that name, naming the close ones and the command that
            lists them all.
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    names = recipe_names()
    if stem not in names:
        raise FileNotFoundError(
            f"no shipped recipe named {name!r}{did_you_mean(stem, names)}; the recipes are "
            f"{preview(names, 4)} (all of them: freekd configs list)"
        )
    return recipe_dir() / f"{stem}.yaml"


def recipe_summary(name: str) -> str:
    """What recipe ``name`` runs: its ``description`` (read with PyYAML when installed), else
    its first comment line."""
    text = recipe_path(name).read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            description = (yaml.safe_load(text) or {}).get("description")
        except (yaml.YAMLError, AttributeError):
            description = None
        if description:
            return " ".join(str(description).split())
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_config(value: str | Path) -> Path:
    """``recipe:NAME`` -> the shipped recipe's file (:func:`recipe_path`); anything else -> the
    path as given."""
    text = str(value)
    if text.startswith(RECIPE_PREFIX):
        return recipe_path(text[len(RECIPE_PREFIX) :])
    return Path(value)


def copy_recipe(name: str, destination: str | Path | None = None, force: bool = False) -> Path:
    """Copy recipe ``name`` to ``destination`` (a file, or a folder to copy it into: an existing
    one or a path ending in ``/``; default: ``NAME.yaml`` in the current folder) and return the
    file written.

    Raises:
        FileExistsError: the file exists and ``force`` is false.
    """
    source = recipe_path(name)
    copy_path = Path(destination) if destination is not None else Path(source.name)
    if copy_path.is_dir() or str(destination).endswith(("/", os.sep)):
        copy_path = copy_path / source.name
    if copy_path.exists() and not force:
        raise FileExistsError(
            f"{str(copy_path)!r} already exists; choose another path or pass force=True"
        )
    copy_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, copy_path)
    return copy_path
