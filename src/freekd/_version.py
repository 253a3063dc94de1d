"""The version of freekd (one place; the package and every file it writes read it here)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
