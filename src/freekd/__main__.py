"""The ``freekd`` command's entry point (also ``python -m freekd``).

The command line (:mod:`freekd.cli`) runs the Lightning pipeline and needs the ``pipeline`` extra
(Lightning, typer, PyYAML, timm, smp, pycocotools, scikit-learn, ...). Installed without it
(``pip install freekd``: the core only), the command prints one line saying what to install
instead of a traceback; ``freekd --version`` works either way.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["PIPELINE_MODULES", "main", "missing_pipeline_modules"]

PIPELINE_MODULES = (
    "typer",
    "yaml",
    "lightning",
    "timm",
    "segmentation_models_pytorch",
    "pycocotools",
    "sklearn",
    "numpy",
    "PIL",
)
"""The top-level modules of the ``pipeline`` extra's packages (``pyproject.toml``)."""

EXIT_MISSING_EXTRA = 2


def missing_pipeline_modules() -> list[str]:
    """The modules of :data:`PIPELINE_MODULES` that cannot be imported here (found, not imported:
    a few milliseconds)."""
    missing = []
    for name in PIPELINE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken one
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> None:
    """Run the ``freekd`` command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    missing = missing_pipeline_modules()
    if missing:
        if args == ["--version"]:
            from ._version import __version__

            print(f"freekd {__version__}")
            raise SystemExit(0)
        print(
            "freekd: error: the freekd command needs the pipeline extra "
            f"(missing: {', '.join(missing)}): pip install 'freekd[pipeline]'",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_MISSING_EXTRA)
    from .cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    main()
