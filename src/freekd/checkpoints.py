"""Model weights in and out: teacher loading that cannot fail silently, student-only export.

``load_weights(model, source)`` reads a state dict (a safetensors file, a torch checkpoint read with
``weights_only=True``, or a mapping), unwraps the usual containers (``state_dict``, ``model``,
``student``/``teacher`` prefixes of a freekd or Lightning checkpoint, DDP's ``module.``), reports
missing and unexpected keys, and refuses to go on when more than ``max_missing`` of the model's
entries would keep their initial values.

``export_student(student, path)`` writes the student's plain ``state_dict`` as safetensors: it
loads with ``strict=True`` into the same architecture built without freekd.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import save_safetensors

__all__ = ["LoadReport", "export_student", "load_weights", "read_state_dict"]

logger = logging.getLogger("freekd")

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


@dataclass
class LoadReport:
    """What :func:`load_weights` did: entries loaded, and the keys that did not match."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    prefix: str = ""

    def __str__(self) -> str:
        text = f"loaded {self.loaded} entries"
        if self.prefix:
            text += f" (prefix {self.prefix!r} removed)"
        if self.missing:
            text += f"; {len(self.missing)} missing: {_preview(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected: {_preview(self.unexpected)}"
        return text


def _preview(keys: list[str], count: int = 5) -> str:
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a file or mapping, containers unwrapped."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: check the path")
        if path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(
                    f"cannot read {str(path)!r} as a weights-only torch checkpoint ({error}); "
                    f"freekd never unpickles code: re-save the state dict with torch.save or as "
                    f"safetensors"
                ) from None
    for key in _CONTAINER_KEYS:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            state = inner
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors: is it a model's state dict?")
    return tensors


def _strip_prefix(
    state: dict[str, Tensor], expected: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], str]:
    """Remove the key prefix (``module.``, ``distiller.student.``, ...) under which most entries
    match the model by name and shape. Refuses a tie between prefixes (a teacher and a student of
    the same architecture in one checkpoint): the caller must say which with ``prefix=``."""

    def fitting(candidate: dict[str, Tensor]) -> int:
        return sum(
            1 for k, v in candidate.items() if k in expected and v.shape == expected[k].shape
        )

    # Candidates: no prefix, and the first one to three dotted components of the keys.
    prefixes = {"."} | {".".join(k.split(".")[:d]) + "." for k in state for d in (1, 2, 3)}
    scored = []
    for prefix in sorted(prefixes):
        stripped = (
            state
            if prefix == "."
            else {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        scored.append((fitting(stripped), "" if prefix == "." else prefix, stripped))
    best_score = max(score for score, _, _ in scored)
    best = [(prefix, stripped) for score, prefix, stripped in scored if score == best_score]
    if len(best) > 1 and best_score > 0:
        names = [prefix or "(none)" for prefix, _ in best]
        raise ValueError(
            f"the checkpoint holds several models that fit ({names}): pass prefix= to choose"
        )
    prefix, stripped = best[0]
    return stripped, prefix


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    max_missing: float = 0.01,
    prefix: str | None = None,
) -> LoadReport:
    """Load ``source`` into ``model``; report and refuse a checkpoint that does not fit.

    Args:
        model: the model to fill.
        source: a ``.safetensors`` file, a torch checkpoint, or a state dict.
        max_missing: largest fraction of the model's entries allowed to be missing (default 1%).
        prefix: key prefix to remove (e.g. ``"teacher."``); found automatically when ``None``.

    Raises ``ValueError`` naming the missing keys when more are missing, or when a tensor's shape
    differs. Logs the missing and unexpected keys otherwise.
    """
    state = read_state_dict(source)
    expected = model.state_dict()
    if prefix is None:
        state, prefix = _strip_prefix(state, expected)
    else:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if shape_errors:
        raise ValueError(
            f"checkpoint does not fit the model, shapes differ for {len(shape_errors)} entries: "
            f"{_preview(shape_errors, 3)}: build the model the checkpoint was saved from"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    report = LoadReport(len(expected) - len(missing), missing, unexpected, prefix)
    if len(missing) > max_missing * len(expected):
        raise ValueError(
            f"checkpoint misses {len(missing)} of the model's {len(expected)} entries "
            f"(more than {max_missing:.0%}): {_preview(missing)}; it was saved from another "
            f"model, or pass max_missing= to accept it"
        )
    model.load_state_dict(state, strict=False)
    if missing or unexpected:
        logger.warning("load_weights: %s", report)
    return report


def export_student(
    student: nn.Module, path: str | os.PathLike, metadata: Mapping[str, object] | None = None
) -> Path:
    """Write ``student.state_dict()`` (nothing else) as safetensors, atomically.

    The file loads with ``load_weights(model, path)`` or ``model.load_state_dict(
    safetensors.torch.load_file(path), strict=True)`` into the same architecture.
    """
    from . import __version__

    info = {"format": "freekd-student/1", "freekd_version": __version__}
    info.update({key: json.dumps(value) for key, value in (metadata or {}).items()})
    return save_safetensors(dict(student.state_dict()), path, info)
