"""Stage 2 of FreeKD: teacher + student + taps + projections + losses -> named loss terms.

The teacher is frozen (no gradients, eval mode, run under ``no_grad`` and stopped as soon as its
taps have fired, unless an output loss needs its head). The student runs its own task loss; its
tapped features go through per-layer projections ``phi`` to the teacher's shapes and then through
the feature losses (each takes all tapped layers as one list, fine to coarse). Output losses
compare named outputs of teacher and student submodules (e.g. box-regression heads). ``mu``
(the weight of each distillation term) lives here, not in the losses.

    distiller = Distiller(
        teacher, student,
        teacher_taps=["backbone.fpn"], student_taps=["backbone.fpn"],
        feature_losses={"freekd": FreeKDLoss.preset("paper", [256] * 5)},
        task_loss=lambda model, batch: model(*batch),   # torchvision detectors return a dict
        example_batch=batch,
    )
    terms = distiller(batch)            # {"task/...": ..., "distill/freekd": ...}
    sum(terms.values()).backward()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice
from .calibration import gradient_norm, weight_from_norms
from .frozen import TaskLoss, freeze, loss_terms
from .losses.freekd import FreeKDLoss
from .taps import FeatureTaps

__all__ = [
    "NONFINITE_POLICIES",
    "PROJECTIONS",
    "Distiller",
    "NonFiniteError",
    "NonFinitePolicy",
    "OutputLoss",
    "Projection",
    "Projector",
    "all_ranks_finite",
    "copy_submodule",
    "default_teacher_input",
    "nonfinite_message",
]

Projector = Literal["auto", "always", "none"]
"""Where the Distiller puts a projection ``phi`` (see :class:`Distiller`)."""
NonFinitePolicy = Literal["raise", "skip", "off"]
"""What a NaN or Inf in a distilled tensor does (see :class:`Distiller`)."""
PROJECTIONS: tuple[str, ...] = get_args(Projector)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)


class NonFiniteError(FloatingPointError, ValueError):
    """A tapped feature, output or loss term holds NaN or Inf (raised by
    ``Distiller(nonfinite="raise")``); ``sources`` names each offending tensor."""

    def __init__(self, message: str, sources: Sequence[str]) -> None:
        super().__init__(message)
        self.sources = list(sources)


def default_teacher_input(batch: Any) -> Any:
    """The model input of a batch: ``batch[0]`` of a ``(inputs, targets)`` pair, ``batch["image"]``
    of a dict, or the batch itself (also a list of per-image dicts, detectron2's / MMDetection's
    batch, which the model takes whole)."""
    if isinstance(batch, list | tuple) and batch:
        if all(isinstance(item, Mapping) for item in batch):
            return batch
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("image", "images", "input", "inputs"):
            if key in batch:
                return batch[key]
        raise KeyError(
            f"cannot tell the model input in a batch with keys {list(batch)}: pass teacher_input="
        )
    return batch


def all_ranks_finite(terms: Mapping[str, Tensor] | Sequence[Tensor] | Tensor) -> bool:
    """Whether every tensor in ``terms`` is finite on this process *and on every other one*.

    For a :class:`Distiller` in your own DDP loop: a NaN seen by one process alone must stop
    (or skip) the step on all of them, or the others wait in the next gradient all-reduce
    forever. One all-reduce of a flag when ``torch.distributed`` is initialized with several
    processes (every process must call it at the same step), none otherwise::

        terms = distiller(batch, raise_nonfinite=False)  # records distiller.last_nonfinite
        if not all_ranks_finite(terms):                  # the same answer on every process
            raise NonFiniteError(nonfinite_message(distiller.last_nonfinite or
                                 ["loss term of another process"]), distiller.last_nonfinite)
        sum(terms.values()).backward()
    """
    if isinstance(terms, Tensor):
        tensors = [terms]
    elif isinstance(terms, Mapping):
        tensors = list(terms.values())
    else:
        tensors = list(terms)
    device = tensors[0].device if tensors else torch.device("cpu")
    flags = [torch.isfinite(t.detach()).all().to(device) for t in tensors]
    local = torch.stack(flags).all() if flags else torch.tensor(True, device=device)
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return bool(local)
    if distributed.get_world_size() < 2:
        return bool(local)
    if distributed.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    bad = (~local).to(device=device, dtype=torch.int32).reshape(1)
    distributed.all_reduce(bad, op=distributed.ReduceOp.MAX)
    return not bool(bad.item())


@dataclass
class OutputLoss:
    """A loss between the outputs of a teacher submodule and a student submodule.

    ``loss(student_output, teacher_output)`` on the tapped tensors (e.g. ``nn.SmoothL1Loss()``
    between box-regression head outputs, as the official RetinaNet recipe), times ``weight``.

    Example:
        >>> from torch import nn
        >>> OutputLoss("head.regression_head", "head.regression_head", nn.SmoothL1Loss())
        OutputLoss(teacher_tap='head.regression_head', student_tap='head.regression_head', \
loss=SmoothL1Loss(), weight=1.0)
    """

    teacher_tap: str
    student_tap: str
    loss: nn.Module
    weight: float = 1.0


class Projection(nn.Module):
    """``phi``: student feature ``[N, C_s, H_s, W_s]`` -> teacher's ``[N, C_t, H_t, W_t]``.

    A 1x1 conv when ``conv`` (channels differ, or ``projection="always"``), then a bilinear resize
    when the grids differ; the identity when neither.
    """

    def __init__(
        self, student_channels: int, teacher_channels: int, size: tuple[int, int] | None, conv: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1) if conv else None
        self.size = size

    def forward(self, feature: Tensor) -> Tensor:
        if self.conv is not None:
            feature = self.conv(feature)
        if self.size is not None and tuple(feature.shape[-2:]) != self.size:
            feature = F.interpolate(feature, size=self.size, mode="bilinear", align_corners=False)
        return feature

    def extra_repr(self) -> str:
        return f"resize_to={self.size}" if self.size is not None else ""


class Distiller(nn.Module):
    """Teacher and student with taps, projections and losses; ``forward(batch)`` -> loss terms.

    Args:
        teacher: trained model, frozen here (in place).
        student: model to train.
        teacher_taps, student_taps: distilled layers (see :mod:`freekd.taps`), fine to coarse,
            yielding the same number of features.
        feature_losses: ``{name: loss}``; each ``loss(student_feats, teacher_feats)`` on the
            projected student features and the teacher's (e.g. FreeKDLoss, a feature MSE).
        task_loss: ``task_loss(student, batch)`` -> scalar or dict of scalars (the student's own
            loss; it must run the student's forward pass).
        example_batch: one batch for the dry run that sizes the projections.
        loss_weights: ``{name: mu}`` for the feature losses (default 1 each).
        projection: ``"auto"`` (1x1 conv / resize only where channels / grids differ),
            ``"always"`` (a 1x1 conv on every layer, the official recipe) or ``"none"``.
        output_losses: ``{name: OutputLoss(...)}`` between submodule outputs.
        teacher_input: ``fn(batch)`` -> the teacher's input (default :func:`default_teacher_input`).
        init_from_teacher: student submodule paths whose weights are copied from the teacher's
            modules of the same path (e.g. ``["neck"]``), shapes checked.
        nonfinite: what a NaN or Inf in a tapped teacher or student feature (or output, or loss
            term) does: ``"raise"`` (default) a :class:`NonFiniteError` naming the tap and the
            fixes; ``"skip"``: nothing here, the names are left in ``last_nonfinite`` for the
            trainer to skip the step (:class:`~freekd.train.DistillModule` does, agreed across
            processes); ``"off"``: no check (saves one host sync per step). In your own DDP
            loop the check is this process's alone: call ``distiller(batch,
            raise_nonfinite=False)`` and raise (or skip) when :func:`all_ranks_finite` of the
            terms is false, so that every process stops at the same step.

    ``forward`` returns ``{"task/<name>": ..., "distill/<name>": weighted term, ...}``: sum the
    values for the objective. Trainable: the student, the projections and any learned part of a
    loss (e.g. FreeKD's MLP gate); never the teacher or the prompts. Hooks stay on teacher and
    student until :meth:`remove_hooks` (or the end of a ``with`` block).

    Raises:
        ValueError: a bad ``projection`` / ``nonfinite`` / ``loss_weights``, taps that do not
            correspond one to one, or features that need a projection with
            ``projection="none"``; :class:`~freekd.taps.TapError` for a bad tap.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from freekd import FeatureMSE
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1))
        >>> student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 1, 1))
        >>> images = torch.randn(2, 3, 8, 8)
        >>> with Distiller(
        ...     teacher, student, teacher_taps=["0"], student_taps=["0"],
        ...     feature_losses={"mse": FeatureMSE()},
        ...     task_loss=lambda model, batch: model(batch).square().mean(),
        ...     example_batch=images,
        ... ) as distiller:
        ...     terms = distiller(images)
        ...     sum(terms.values()).backward()
        >>> sorted(terms), distiller.projections[0]  # 4 -> 8 channels: a 1x1 conv
        (['distill/mse', 'task'], Projection(
          (conv): Conv2d(4, 8, kernel_size=(1, 1), stride=(1, 1))
        ))
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_taps: Sequence[str],
        student_taps: Sequence[str],
        feature_losses: Mapping[str, nn.Module],
        task_loss: TaskLoss,
        example_batch: Any,
        loss_weights: Mapping[str, float] | None = None,
        projection: Projector = "auto",
        output_losses: Mapping[str, OutputLoss] | None = None,
        teacher_input: Callable[[Any], Any] = default_teacher_input,
        init_from_teacher: Sequence[str] = (),
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__()
        check_choice("projection", projection, PROJECTIONS)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.nonfinite: str = nonfinite
        self.last_nonfinite: list[str] = []
        unknown = set(loss_weights or {}) - set(feature_losses)
        if unknown:
            raise ValueError(
                f"loss_weights name {sorted(unknown)}, which are not feature losses "
                f"{sorted(feature_losses)}"
            )
        self.teacher = freeze(teacher).eval()
        self.student = student
        self.feature_losses = nn.ModuleDict(feature_losses)
        for loss in self.feature_losses.values():
            if isinstance(loss, FreeKDLoss):
                loss.prompts.requires_grad_(False)
        self.loss_weights = {
            name: float((loss_weights or {}).get(name, 1.0)) for name in feature_losses
        }
        self.output_losses = dict(output_losses or {})
        self.output_loss_modules = nn.ModuleDict({k: v.loss for k, v in self.output_losses.items()})
        self.task_loss = task_loss
        self.teacher_input = teacher_input
        self.num_feature_taps = (len(teacher_taps), len(student_taps))
        output_teacher_taps = [o.teacher_tap for o in self.output_losses.values()]
        output_student_taps = [o.student_tap for o in self.output_losses.values()]
        self._teacher_taps = FeatureTaps(
            teacher, [*teacher_taps, *output_teacher_taps], stop_after_capture=True
        )
        self._student_taps = FeatureTaps(student, [*student_taps, *output_student_taps])
        self._teacher_feature_specs = list(teacher_taps)
        self._student_feature_specs = list(student_taps)
        for path in init_from_teacher:
            copy_submodule(teacher, student, path)
        self.projections = self._build_projections(example_batch, projection)

    # ------------------------------------------------------------------ set-up

    def _build_projections(self, batch: Any, projection: Projector) -> nn.ModuleList:
        """Dry run on ``batch``: one projection per tapped layer, sized by the features."""
        teacher_feats, _ = self._teacher_forward(batch)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            self._student_taps.clear()
            self._student_taps.run(self.student, self.teacher_input(batch))
        self.student.train(was_training)
        student_feats = self._student_feature_list()
        if len(student_feats) != len(teacher_feats):
            raise ValueError(
                f"student taps {self._student_feature_specs} yield {len(student_feats)} features, "
                f"teacher taps {self._teacher_feature_specs} yield {len(teacher_feats)}: tap "
                f"layers that correspond one to one"
            )
        projections = []
        for index, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"layer {index}: distilled features must be [N, C, H, W], got student "
                    f"{tuple(s.shape)} and teacher {tuple(t.shape)}: tap layers that output "
                    f"maps (for token sequences [N, L, C] add '@tokens' to the tap)"
                )
            channels_differ = s.shape[1] != t.shape[1]
            grid = tuple(t.shape[-2:]) if s.shape[-2:] != t.shape[-2:] else None
            if projection == "none" and (channels_differ or grid is not None):
                raise ValueError(
                    f"layer {index}: student feature {tuple(s.shape)} and teacher "
                    f"{tuple(t.shape)} differ and projection='none': use projection='auto'"
                )
            conv = projection == "always" or channels_differ
            projections.append(Projection(s.shape[1], t.shape[1], grid, conv))
        return nn.ModuleList(projections).to(student_feats[0].device)

    # ------------------------------------------------------------------ forward

    def _teacher_forward(self, batch: Any) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher features and output-loss tensors, under ``no_grad`` in eval mode."""
        self.teacher.eval()
        with torch.no_grad():
            self._teacher_taps.run(self.teacher, self.teacher_input(batch))
        tapped = self._teacher_taps.features
        count = len(tapped) - len(self.output_losses)
        return tapped[:count], tapped[count:]

    def _student_feature_list(self) -> list[Tensor]:
        tapped = self._student_taps.features
        return tapped[: len(tapped) - len(self.output_losses)]

    def forward(self, batch: Any, raise_nonfinite: bool = True) -> dict[str, Tensor]:
        """``batch`` -> ``{"task/<name>": ..., "distill/<name>": ..., "output/<name>": ...}``.

        ``raise_nonfinite=False``: with ``nonfinite="raise"``, only record the non-finite
        tensors in ``last_nonfinite`` (the trainer then raises on every process at once)."""
        teacher_feats, teacher_outputs = self._teacher_forward(batch)
        self._student_taps.clear()
        terms = loss_terms(self.task_loss(self.student, batch), "task")
        tapped = self._student_taps.features
        student_feats = tapped[: len(tapped) - len(self.output_losses)]
        student_outputs = tapped[len(student_feats) :]
        projected = [phi(f) for phi, f in zip(self.projections, student_feats, strict=True)]
        for name, loss in self.feature_losses.items():
            terms[f"distill/{name}"] = self.loss_weights[name] * loss(projected, teacher_feats)
        for (name, spec), s, t in zip(
            self.output_losses.items(), student_outputs, teacher_outputs, strict=True
        ):
            terms[f"output/{name}"] = spec.weight * spec.loss(s, t)
        self._check_finite(teacher_feats + teacher_outputs, tapped, terms, raise_nonfinite)
        return terms

    def calibrate(self, batches: Iterable[Any]) -> dict[str, float]:
        """``{name: mu0}`` for every feature loss: the weight at which ``mu0 * loss`` pulls the
        student's tapped features (before projection) as hard as the student's task loss does,
        ``||grad_F(mu0 * L)|| = ||grad_F(L_task)||`` with the norms summed over ``batches``
        (:func:`freekd.calibrate_weight`). Call it at initialization, then set
        ``loss_weights[name] = factor * mu0`` (factor 1 is the measured default; sweep
        ``1/3, 1, 3`` to tune). Weights, buffers (BatchNorm statistics), train/eval mode and the
        random-number streams are left as they were, so a calibrated run starts exactly like an
        uncalibrated one.

        Raises:
            ValueError: no batch, or a loss without gradient on the student's features.
        """
        # the frozen teacher runs in eval mode under no_grad: only the trained parts can change
        trained = [self.student, self.projections, self.feature_losses]
        state = [{k: v.clone() for k, v in part.state_dict().items()} for part in trained]
        mode = [(module, module.training) for module in self.modules()]
        device = next(self.student.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []
        task_norm, distill_norms, count = 0.0, dict.fromkeys(self.feature_losses, 0.0), 0
        self.train()
        with torch.random.fork_rng(devices=devices):
            for batch in batches:
                teacher_feats, _ = self._teacher_forward(batch)
                self._student_taps.clear()
                task = sum(loss_terms(self.task_loss(self.student, batch), "task").values())
                student_feats = self._student_feature_list()
                projected = [phi(f) for phi, f in zip(self.projections, student_feats, strict=True)]
                task_norm += gradient_norm(task, student_feats)
                for name, loss in self.feature_losses.items():
                    term = loss(projected, teacher_feats)
                    distill_norms[name] += gradient_norm(term, student_feats)
                count += 1
        self._student_taps.clear()
        for part, part_state in zip(trained, state, strict=True):
            part.load_state_dict(part_state)
        for module, training in mode:
            module.training = training
        if count == 0:
            raise ValueError("calibrate needs at least one batch")
        return {name: weight_from_norms(task_norm, norm) for name, norm in distill_norms.items()}

    # ------------------------------------------------------------------ non-finite values

    def _check_finite(
        self,
        teacher_tapped: list[Tensor],
        student_tapped: list[Tensor],
        terms: dict[str, Tensor],
        raise_nonfinite: bool = True,
    ) -> None:
        """Set ``last_nonfinite`` to the names of the tensors holding NaN/Inf (one host sync for
        all of them); raise :class:`NonFiniteError` when ``nonfinite="raise"``."""
        self.last_nonfinite = []
        if self.nonfinite == "off":
            return
        tensors = [*teacher_tapped, *student_tapped, *terms.values()]
        device = tensors[0].device
        flags = torch.stack([torch.isfinite(t.detach()).all().to(device) for t in tensors])
        if bool(flags.all()):
            return
        names = [
            *_tap_labels(self._teacher_taps, "teacher"),
            *_tap_labels(self._student_taps, "student"),
            *(f"loss term {name!r}" for name in terms),
        ]
        if len(names) != len(tensors):  # a tap layout this labelling does not know
            names = [f"tensor {i}" for i in range(len(tensors))]
        self.last_nonfinite = [n for n, ok in zip(names, flags.tolist(), strict=True) if not ok]
        if self.nonfinite == "raise" and raise_nonfinite:
            raise NonFiniteError(nonfinite_message(self.last_nonfinite), self.last_nonfinite)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, projections and learned loss parts: what the optimizer should get."""
        return [p for p in self.parameters() if p.requires_grad]

    def remove_hooks(self) -> None:
        """Detach the taps from teacher and student (the models work alone again; idempotent)."""
        self._teacher_taps.remove()
        self._student_taps.remove()

    def __enter__(self) -> Distiller:
        """``with Distiller(...) as distiller:``; the hooks are removed on leaving the block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove_hooks()


def copy_submodule(source: nn.Module, target: nn.Module, path: str) -> None:
    """Copy the weights of ``source``'s submodule ``path`` into ``target``'s (shapes checked)."""
    try:
        source_module, target_module = source.get_submodule(path), target.get_submodule(path)
    except AttributeError as error:
        raise ValueError(f"init_from_teacher: no submodule {path!r} ({error})") from None
    source_state, target_state = source_module.state_dict(), target_module.state_dict()
    mismatched = [
        f"{k}: teacher {tuple(v.shape)}, student {tuple(target_state[k].shape)}"
        for k, v in source_state.items()
        if k in target_state and v.shape != target_state[k].shape
    ]
    if mismatched or source_state.keys() != target_state.keys():
        detail = mismatched or sorted(set(source_state) ^ set(target_state))
        raise ValueError(f"init_from_teacher: {path!r} differs between the models: {detail[:5]}")
    target_module.load_state_dict(source_state)


def _tap_labels(taps: FeatureTaps, role: str) -> list[str]:
    """One label per tapped tensor of the last pass: ``"student feature of tap 'layer1'"``, with
    ``[j]`` for the ``j``-th entry of a tap that yields several (a list or dict output)."""
    captured = getattr(taps, "_captured", {})
    labels = []
    for index, spec in enumerate(taps.specs):
        count = len(captured.get(index, ()))
        if count == 1:
            labels.append(f"{role} feature of tap {spec!r}")
        else:
            labels.extend(f"{role} feature of tap {spec!r}[{j}]" for j in range(count))
    return labels


def nonfinite_message(sources: Sequence[str]) -> str:
    """One line: which tensors hold NaN/Inf, the likely cause and the fixes."""
    listed = ", ".join(sources[1:4]) + (", ..." if len(sources) > 4 else "")
    more = f" (and {len(sources) - 1} more: {listed})" if len(sources) > 1 else ""
    if sources[0].startswith("teacher"):
        cause = (
            "the frozen teacher produced it: check the teacher checkpoint and the input data "
            "(NaN/Inf pixels, unnormalized values), or run the teacher in float32"
        )
    else:
        cause = (
            "training diverged or the input holds NaN/Inf: lower the learning rate, clip "
            "gradients (train.grad_clip_norm), train in bf16 rather than fp16, check the input "
            "data"
        )
    return (
        f"NaN or Inf in the {sources[0]}{more}; {cause}; or pass nonfinite='skip' to skip "
        f"such steps"
    )
