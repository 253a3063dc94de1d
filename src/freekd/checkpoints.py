"""Model weights in and out: teacher loading that cannot fail silently, student-only export.

``load_weights(model, source)`` reads a state dict (a safetensors file, a torch checkpoint read with
``weights_only=True``, or a mapping), unwraps the usual containers (``state_dict``, ``model``,
``student``/``teacher`` prefixes of a freekd or Lightning checkpoint, DDP's ``module.``), reports
missing and unexpected keys, and refuses to go on when more than ``max_missing`` of the model's
entries would keep their initial values, or when the file holds more than that many entries the
model lacks (another, larger model).

Every file is read through :func:`read_torch_file` or :func:`read_safetensors_file`: an empty,
truncated, damaged or foreign file raises one ``ValueError`` naming the file, what is wrong with it
and the fix.

``export_student(student, path)`` writes the student's plain ``state_dict`` as safetensors: it
loads with ``strict=True`` into the same architecture built without freekd.

``state_sha256(module)`` fingerprints a model's weights: training checkpoints leave the frozen
teacher out and keep its fingerprint, which a resumed run checks against the teacher it rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import preview
from ._io import save_safetensors
from ._version import __version__

__all__ = [
    "LoadReport",
    "checkpoint_job",
    "checkpoint_origin",
    "export_student",
    "load_weights",
    "read_safetensors_file",
    "read_state_dict",
    "read_torch_file",
    "state_sha256",
]

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
            text += f"; {len(self.missing)} missing: {preview(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected: {preview(self.unexpected)}"
        return text


def _short(error: BaseException) -> str:
    """The first sentence of an exception's message (library messages run over lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    sentence = text.split(". ")[0]
    return sentence if len(sentence) <= 160 else sentence[:157] + "..."


def _check_readable(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        kind = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {str(path)!r} {kind}: check the path")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (0 bytes, an interrupted copy?): {fix}")


def read_torch_file(
    path: str | os.PathLike, what: str = "checkpoint", fix: str = "copy or save it again"
) -> Any:
    """The object saved by ``torch.save`` in ``path``, read with ``weights_only=True`` (no code
    runs; zip files are memory-mapped, so reading the keys of a large file is cheap).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for an
    empty, truncated or damaged one (``fix`` says what to do then), one that is no torch file at
    all (text, an image ...) and one that holds pickled code."""
    path = Path(path)
    _check_readable(path, what, fix)
    with open(path, "rb") as handle:
        head = handle.read(8)
    zipped = head.startswith(b"PK\x03\x04")
    if not zipped and not head.startswith(b"\x80"):  # torch.save: a zip, or a protocol-2 pickle
        raise ValueError(
            f"{what} {str(path)!r} is not a file written by torch.save (it starts with "
            f"{head!r}): pass a .pt / .pth / .ckpt written by torch.save, or a .safetensors file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise ValueError(
                f"{what} {str(path)!r} is truncated or damaged ({_short(error)}): {fix}"
            ) from None
        raise ValueError(
            f"cannot read {str(path)!r} as a weights-only torch checkpoint (it holds objects "
            f"other than tensors and plain data); freekd never unpickles code: re-save the state "
            f"dict with torch.save or as safetensors"
        ) from None
    except Exception as error:  # torch raises RuntimeError / EOFError / ... for broken files
        raise ValueError(
            f"{what} {str(path)!r} is truncated or damaged ({_short(error)}): {fix}"
        ) from None


def read_safetensors_file(
    path: str | os.PathLike, what: str = "checkpoint"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ``ValueError`` naming the file when it is
    empty, truncated, damaged or no safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    _check_readable(path, what, "copy or export it again")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{what} {str(path)!r} is not a readable safetensors file ({_short(error)}): it is "
            f"truncated or damaged; copy or export it again"
        ) from None
    return tensors, metadata


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a file or mapping, containers unwrapped."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if path.suffix == ".safetensors":
            state = read_safetensors_file(path)[0]
        else:
            state = read_torch_file(path)
    for key in _CONTAINER_KEYS:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            state = inner
            break
    if not isinstance(state, Mapping):
        raise ValueError(
            f"the checkpoint holds a {type(state).__name__}, not a state dict: save "
            f"model.state_dict()"
        )
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors: is it a model's state dict?")
    return tensors


_JOB_PREFIXES = {"model.": "train-teacher", "tuner.": "tune-prompts", "distiller.": "distill"}
"""Key prefixes of the Lightning modules of :mod:`freekd.train` -> the job that writes them."""


def checkpoint_job(checkpoint: Mapping[str, Any]) -> str | None:
    """The freekd job that wrote a Lightning checkpoint (the dict in a ``.ckpt``): the name
    recorded in it (``"train-teacher"``, ``"tune-prompts"``, ``"distill"``,
    ``"distill --baseline"``), else guessed from its state-dict keys; ``None`` when neither
    tells."""
    recorded = checkpoint.get("freekd")
    if isinstance(recorded, Mapping) and isinstance(recorded.get("job"), str):
        return recorded["job"]
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        for prefix, job in _JOB_PREFIXES.items():
            if state and all(str(key).startswith(prefix) for key in state):
                return job
    return None


def checkpoint_origin(path: str | os.PathLike) -> str | None:
    """What a weights file says it holds, for error messages: ``"the teacher pspnet/resnet34"``
    (metadata of a file written by :func:`export_student`), ``"a tune-prompts checkpoint"``
    (a job's ``.ckpt``), ``"tuned prompts"``; ``None`` when the file does not say (or cannot be
    read)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            if metadata.get("format", "").startswith("freekd-prompts"):
                return "tuned prompts (a prompt file, not model weights)"
            keys = ("role", "arch", "backbone")
            info = {k: json.loads(metadata[k]) for k in keys if k in metadata}
            if "arch" in info and "backbone" in info:
                return f"the {info.get('role', 'model')} {info['arch']}/{info['backbone']}"
            return None
        job = checkpoint_job(read_torch_file(path))
    except Exception:  # only a hint: the caller reports the real problem
        return None
    return f"a {job} checkpoint" if job else None


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
    max_unexpected: float | None = None,
) -> LoadReport:
    """Load ``source`` into ``model``; report and refuse a checkpoint that does not fit.

    Args:
        model: the model to fill.
        source: a ``.safetensors`` file, a torch checkpoint, or a state dict.
        max_missing: largest fraction of the model's entries allowed to be missing (default 1%).
        prefix: key prefix to remove (e.g. ``"teacher."``); found automatically when ``None``.
        max_unexpected: largest number of entries the model lacks, as a fraction of the model's
            entries (default: ``max_missing``): a file of a larger model (a ResNet-34 into a
            ResNet-18) fits by name where the models agree and would load without error.

    Logs the missing and unexpected keys when there are any (within the limits).

    Returns:
        A :class:`LoadReport`: the entries loaded, the missing and unexpected keys, the prefix
        removed.

    Raises:
        ValueError: more entries are missing (or unexpected) than allowed, or a tensor's shape
            differs; the message names the keys and, for a file, the model it says it holds.
        FileNotFoundError: ``source`` is a path to no file.

    Example:
        >>> from torch import nn
        >>> student = nn.Linear(2, 3)
        >>> state = {"student." + k: v for k, v in nn.Linear(2, 3).state_dict().items()}
        >>> print(load_weights(student, state))
        loaded 2 entries (prefix 'student.' removed)
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
            f"{preview(shape_errors, 3)}{_holds(source)}: build the model the checkpoint was "
            f"saved from"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    report = LoadReport(len(expected) - len(missing), missing, unexpected, prefix)
    if len(missing) > max_missing * len(expected):
        raise ValueError(
            f"checkpoint misses {len(missing)} of the model's {len(expected)} entries "
            f"(more than {max_missing:.0%}): {preview(missing)}{_holds(source)}; it was saved "
            f"from another model, or pass max_missing= to accept it"
        )
    limit = max_missing if max_unexpected is None else max_unexpected
    if len(unexpected) > limit * len(expected):
        raise ValueError(
            f"checkpoint holds {len(unexpected)} entries the model lacks (more than {limit:.0%} "
            f"of its {len(expected)}): {preview(unexpected)}{_holds(source)}; it was saved "
            f"from another model, or pass max_unexpected= to accept it"
        )
    model.load_state_dict(state, strict=False)
    if missing or unexpected:
        logger.warning("load_weights: %s", report)
    return report


def _holds(source: str | os.PathLike | Mapping[str, Tensor]) -> str:
    """`` (the file holds ...)`` for an error message about a file that says what it holds."""
    origin = None if isinstance(source, Mapping) else checkpoint_origin(source)
    return f" (the file holds {origin})" if origin else ""


def export_student(
    student: nn.Module, path: str | os.PathLike, metadata: Mapping[str, object] | None = None
) -> Path:
    """Write ``student.state_dict()`` (nothing else) as safetensors, atomically.

    The file loads with ``load_weights(model, path)`` or ``model.load_state_dict(
    safetensors.torch.load_file(path), strict=True)`` into the same architecture; ``metadata``
    (JSON-encoded) is stored beside ``format`` and ``freekd_version``.

    Returns:
        The path written.

    Raises:
        OSError: the folder cannot be written.

    Example:
        >>> import tempfile, pathlib
        >>> from torch import nn
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = export_student(nn.Linear(2, 3), pathlib.Path(folder) / "student.safetensors")
        ...     print(load_weights(nn.Linear(2, 3), path))
        loaded 2 entries
    """
    info = {"format": "freekd-student/1", "freekd_version": __version__}
    info.update({key: json.dumps(value) for key, value in (metadata or {}).items()})
    return save_safetensors(dict(student.state_dict()), path, info)


def state_sha256(source: nn.Module | Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of a model's ``state_dict()`` (or of a state dict): every entry's name,
    dtype, shape and bytes, in name order. Equal for equal weights wherever they live (CPU or
    GPU, any file format); a changed entry changes it.

    Example:
        >>> from torch import nn
        >>> a, b = nn.Linear(2, 3), nn.Linear(2, 3)
        >>> state_sha256(a) == state_sha256(a.state_dict()), state_sha256(a) == state_sha256(b)
        (True, False)
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, Tensor):
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
