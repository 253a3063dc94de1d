"""The logger of a training job: ``csv`` (default), ``tensorboard``, ``wandb`` or ``mlflow``.

:func:`make_logger` builds the Lightning logger that ``TrainConfig.logger`` names, with
``TrainConfig.logger_args`` passed to its constructor over freekd's defaults; every logger gets
the same values (each loss term, ``train/distill/<name>`` and its per-layer terms, the
objective, the learning rate). The packages of ``tensorboard``, ``wandb`` and ``mlflow`` are
imported only when chosen; a missing one raises ``ModuleNotFoundError`` naming the extra
(``pip install 'freekd[wandb]'``). Defaults, each replaced by the same key of ``logger_args``
and, where an environment variable is named, by that variable when it is set::

    csv          run_dir/logs/version_N/metrics.csv (a new version per start)
    tensorboard  run_dir/logs/version_N/events.out.tfevents.*
    wandb        save_dir run_dir/logs (WANDB_DIR): run_dir/logs/wandb/<run folder>/;
                 project "freekd" (WANDB_PROJECT); name "<run>/<job>" (WANDB_NAME);
                 online unless offline=True or WANDB_MODE=offline
    mlflow       tracking_uri file://<run_dir>/logs/mlruns (MLFLOW_TRACKING_URI);
                 experiment_name "freekd" (MLFLOW_EXPERIMENT_NAME); run_name "<run>/<job>"

``<run>/<job>`` are the last two parts of ``run_dir`` (``my_run/student_freekd`` for a job of
the command line). Each start (a resume too) is a new wandb or MLflow run. MLflow 3 refuses its
file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true: for a ``file:`` tracking URI and the
variable unset, it is set to ``true`` for the process (``mlflow-skinny`` has no database store).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import loggers
from lightning.pytorch.utilities import rank_zero_only

from .._checks import did_you_mean, quoted
from .config import TrainConfig

__all__ = ["LOGGER_PACKAGES", "FolderSafeMLFlowLogger", "finish_logger", "make_logger"]

LOGGER_PACKAGES: dict[str, tuple[str, ...]] = {
    "csv": (),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}
"""The modules each logger needs (any one of them), importable under the extra of its name."""


class FolderSafeMLFlowLogger(loggers.MLFlowLogger):
    """Lightning's ``MLFlowLogger``, writing ``.`` for ``/`` in metric names when the tracking
    URI is a ``file:`` store: that store keeps each metric in a file named after it, so
    ``train/distill/freekd`` could not sit beside ``train/distill/freekd/layer0`` (a folder
    then); ``train.distill.freekd.layer0`` can. Servers and databases get the names as
    logged."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._tracking_uri.startswith("file:"):
            metrics = {name.replace("/", "."): value for name, value in metrics.items()}
        super().log_metrics(metrics, step)


@dataclass(frozen=True)
class _Choice:
    """One logger: its Lightning class and its default arguments for a run."""

    logger_class: type
    defaults: Callable[[Path], dict[str, Any]]
    forwards_to: Callable[[], Callable[..., Any]] | None = None
    """What the class passes its ``**kwargs`` to (their names are accepted too)."""
    replaces: tuple[tuple[str, str], ...] = ()
    """``(key, default)``: a ``logger_args`` key that takes the place of another default (the
    class would otherwise prefer the default: wandb's ``save_dir`` over ``dir``, MLflow's
    ``tracking_uri`` over ``save_dir``)."""


def _environment(name: str, default: Any) -> Any:
    """The environment variable ``name`` when it is set (not empty), else ``default``."""
    return os.environ.get(name) or default


def _run_name(run_dir: Path) -> str:
    """``"my_run/student_freekd"``: the last two parts of ``run_dir``."""
    return "/".join(Path(run_dir).resolve().parts[-2:])


def _csv_defaults(run_dir: Path) -> dict[str, Any]:
    return {"save_dir": run_dir, "name": "logs"}


def _tensorboard_defaults(run_dir: Path) -> dict[str, Any]:
    return {"save_dir": run_dir, "name": "logs", "default_hp_metric": False}


def _wandb_defaults(run_dir: Path) -> dict[str, Any]:
    return {
        "save_dir": _environment("WANDB_DIR", str(run_dir / "logs")),
        "project": _environment("WANDB_PROJECT", "freekd"),
        "name": _environment("WANDB_NAME", _run_name(run_dir)),
    }


def _mlflow_defaults(run_dir: Path) -> dict[str, Any]:
    store = (Path(run_dir) / "logs" / "mlruns").resolve()
    return {
        "tracking_uri": _environment("MLFLOW_TRACKING_URI", store.as_uri()),
        "experiment_name": _environment("MLFLOW_EXPERIMENT_NAME", "freekd"),
        "run_name": _run_name(run_dir),
    }


def _wandb_init() -> Callable[..., Any]:
    import wandb

    return wandb.init


def _summary_writer() -> Callable[..., Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter.__init__


_CHOICES: dict[str, _Choice] = {
    "csv": _Choice(loggers.CSVLogger, _csv_defaults),
    "tensorboard": _Choice(loggers.TensorBoardLogger, _tensorboard_defaults, _summary_writer),
    "wandb": _Choice(loggers.WandbLogger, _wandb_defaults, _wandb_init, (("dir", "save_dir"),)),
    "mlflow": _Choice(
        FolderSafeMLFlowLogger, _mlflow_defaults, replaces=(("save_dir", "tracking_uri"),)
    ),
}


def _require(name: str) -> None:
    """Import one of the modules the logger ``name`` needs, or raise ``ModuleNotFoundError``
    naming its extra."""
    modules = LOGGER_PACKAGES[name]
    for module in modules:
        try:
            importlib.import_module(module)
            return
        except ImportError:
            continue
    if modules:
        raise ModuleNotFoundError(
            f"TrainConfig.logger={name!r} needs the {modules[0]} package: pip install "
            f"'freekd[{name}]', or choose TrainConfig.logger='csv'",
            name=modules[0],
        )


def _parameter_names(function: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword names ``function`` takes, and whether it also takes ``**kwargs``."""
    parameters = inspect.signature(function).parameters.values()
    names = {
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _check_arguments(choice: _Choice, args: dict[str, Any]) -> None:
    """Refuse a key of ``logger_args`` that the logger (or what it forwards to) does not take."""
    accepted, open_ended = _parameter_names(choice.logger_class.__init__)
    if open_ended and choice.forwards_to is not None:
        forwarded, open_ended = _parameter_names(choice.forwards_to())
        accepted |= forwarded
    if open_ended:
        return
    for key in args:
        if key not in accepted:
            raise ValueError(
                f"TrainConfig.logger_args: {key!r} is not an argument of Lightning's "
                f"{_lightning_name(choice.logger_class)}{did_you_mean(key, accepted)}: remove "
                f"it, or use one of {quoted(sorted(accepted))}"
            )


def _arguments(choice: _Choice, run_dir: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The defaults of ``choice`` for ``run_dir``, updated with the ``given`` arguments."""
    defaults = choice.defaults(run_dir)
    for key, default in choice.replaces:
        if key in given and default not in given:
            defaults[default] = None  # None: the class's own rule (not its default value)
    return {**defaults, **given}


def _lightning_name(logger_class: type) -> str:
    """The name of the Lightning class ``logger_class`` is (or extends)."""
    lightning = [c for c in logger_class.__mro__ if c.__module__.startswith("lightning.")]
    return (lightning[0] if lightning else logger_class).__name__


def _mlflow_uri(arguments: dict[str, Any]) -> str:
    """The tracking URI an ``MLFlowLogger`` built with ``arguments`` uses (Lightning:
    ``file:<save_dir>`` without one)."""
    return str(arguments.get("tracking_uri") or f"file:{arguments.get('save_dir') or './mlruns'}")


def _allow_mlflow_file_store(arguments: dict[str, Any]) -> None:
    """Let MLflow 3 open a ``file:`` store (see the module docstring); a user's own setting of
    ``MLFLOW_ALLOW_FILE_STORE`` is kept."""
    if _mlflow_uri(arguments).startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _construct(logger_class: type, arguments: dict[str, Any]) -> Any:
    """``logger_class(**arguments)``; MLflow's refusal of a file store in one line."""
    try:
        return logger_class(**arguments)
    except Exception as error:
        refused = "MLFLOW_ALLOW_FILE_STORE" in str(error)
        if type(error).__name__ != "MlflowException" or not refused:
            raise
        raise ValueError(
            f"TrainConfig.logger='mlflow': MLflow refuses the file store at "
            f"{_mlflow_uri(arguments)!r} because MLFLOW_ALLOW_FILE_STORE is set to "
            f"{os.environ.get('MLFLOW_ALLOW_FILE_STORE')!r}: unset it, or give "
            f"TrainConfig.logger_args a tracking_uri of an MLflow server"
        ) from None


def make_logger(config: TrainConfig) -> Any:
    """The Lightning logger of ``config`` (``False`` for ``logger=None``): the class that
    ``config.logger`` names, built with its defaults for ``config.run_dir`` (module docstring)
    updated with ``config.logger_args``.

    Raises ``ModuleNotFoundError`` naming the extra to install when the logger's package is
    missing, and ``ValueError`` for a key of ``logger_args`` that the logger does not take.
    """
    if config.logger is None:
        return False
    _require(config.logger)
    choice = _CHOICES[config.logger]
    _check_arguments(choice, config.logger_args)
    arguments = _arguments(choice, Path(config.run_dir), config.logger_args)
    if config.logger == "mlflow":
        _allow_mlflow_file_store(arguments)
    return _construct(choice.logger_class, arguments)


def finish_logger(logger: Any, failed: bool = False) -> None:
    """End the wandb run that ``logger`` started (Lightning leaves it open, and the next
    ``WandbLogger`` of the process would log into it); nothing for the other loggers."""
    run = getattr(logger, "_experiment", None) if isinstance(logger, loggers.WandbLogger) else None
    finish = getattr(run, "finish", None)
    if callable(finish):
        finish(exit_code=1 if failed else 0)
