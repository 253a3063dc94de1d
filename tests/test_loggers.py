"""The loggers of a training job (``train.logger``): wandb offline and an MLflow file store get
every term the CSV logger gets (read back from the wandb run file and through MLflow's
client), ``logger_args`` reach the constructor over freekd's defaults, the loggers' own
environment variables are kept, and a missing package or bad ``logger_args`` is one line."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback
from typer.testing import CliRunner

from freekd.cli import app
from freekd.pipeline.config import load_config
from freekd.pipeline.jobs import _job_files
from freekd.pipeline.schema import ConfigError
from freekd.train import TrainConfig, fit, make_train_loader
from freekd.train.loggers import LOGGER_PACKAGES, make_logger
from tests.test_train import Images, config, make_distill_module

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

ENVIRONMENT = (
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_PROJECT",
    "WANDB_NAME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ALLOW_FILE_STORE",
)
"""Variables the loggers read (or, for MLflow's file store and Lightning's offline wandb,
set): unset for each test, and restored after it."""

STEPS = 4
TINY_RECIPE = """\
task: segmentation
run_dir: {run_dir}
device: cpu
data:
  name: digits
  args: {{size: 32, max_digits: 1, digit_scale: [0.4, 0.7]}}
  train_args: {{length: 4}}
  val_args: {{length: 2}}
  batch_size: 2
  crop_size: 32
  hflip_prob: 0.0
teacher:
  arch: pspnet
  backbone: resnet18
  train: {{steps: 1, optimizer: {{name: adamw, lr: 0.001}}}}
student: {{arch: pspnet, backbone: resnet18}}
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No logger variable of the machine, wandb's own files under ``tmp_path``, and every
    variable back as it was afterwards (a set-then-delete records the original state)."""
    for name in ENVIRONMENT:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


class RecordTerms(Callback):
    """The ``train/...`` values of every step, keyed by the step the loggers are given (Lightning
    logs step ``k`` with the global step before its optimizer step: ``k - 1`` here)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        values = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("train/")
        }
        self.steps[trainer.global_step - 1] = values


def run_tiny_job(run_dir: Path, logger: str, logger_args: dict[str, Any]) -> RecordTerms:
    """A 4-step distillation job logged by ``logger``; what it logged at each step."""
    recorder = RecordTerms()
    settings = config(run_dir, STEPS, logger=logger, logger_args=logger_args)
    fit(
        make_distill_module(total=STEPS),
        make_train_loader(Images(8), 2, seed=0),
        config=settings,
        callbacks=[recorder],
    )
    assert sorted(recorder.steps) == list(range(STEPS))
    for values in recorder.steps.values():  # the distillation terms are among them
        assert {"train/distill/freekd", "train/distill/freekd/layer0", "train/task"} <= set(values)
    return recorder


# ---------------------------------------------------------------------------- wandb


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a wandb run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log blocks of 32 KiB holding chunks (checksum, length, type: full,
    first, middle, last) of protobuf ``Record`` messages."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no wandb run file"
    offset, block, pieces = 7, 32768, b""
    while offset + 7 <= len(data):
        left = block - offset % block
        if left < 7:  # the block's padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:  # the zeros after the last record
            return
        if kind == 1:
            yield payload
        elif kind == 2:
            pieces = payload
        elif kind == 3:
            pieces += payload
        elif kind == 4:
            yield pieces + payload


def wandb_run(path: Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """``({project, name}, history rows)`` of a wandb run file."""
    from wandb.proto import wandb_internal_pb2

    run, rows = {}, []
    for payload in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "name": record.run.display_name}
        elif kind == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return run, rows


def test_wandb_offline_run_holds_every_logged_term(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "tiny" / "student"
    recorded = run_tiny_job(run_dir, "wandb", {"offline": True, "project": "freekd-tests"})
    (run_file,) = run_dir.glob("logs/wandb/offline-run-*/run-*.wandb")  # under the job folder
    run, rows = wandb_run(run_file)
    assert run == {"project": "freekd-tests", "name": "tiny/student"}
    logged = {row["trainer/global_step"]: row for row in rows if "train/loss" in row}
    assert sorted(logged) == sorted(recorded.steps)
    for step, values in recorded.steps.items():
        for name, value in values.items():
            assert logged[step][name] == pytest.approx(value, rel=1e-6), (step, name)
    assert any("lr-SGD" in row for row in rows)
    # the job's summary names the run
    rows = dict(_job_files(run_dir))
    assert rows[f"{run_file.parent.relative_to(run_dir)}/"].startswith("the wandb run (offline: ")


def test_wandb_runs_of_one_process_stay_apart(tmp_path):
    """Each job ends its wandb run: the next job of the process (the demo runs four) gets its
    own run, not Lightning's reuse of the open one."""
    wandb = pytest.importorskip("wandb")
    for name in ("first", "second"):
        run_tiny_job(tmp_path / name, "wandb", {"offline": True})
        assert wandb.run is None
    files = [
        next((tmp_path / n).glob("logs/wandb/offline-run-*/run-*.wandb"))
        for n in ("first", "second")
    ]
    names = [wandb_run(path)[0]["name"] for path in files]
    assert names == [f"{tmp_path.name}/first", f"{tmp_path.name}/second"]


# ---------------------------------------------------------------------------- MLflow


def test_mlflow_file_store_in_the_job_folder_holds_every_logged_term(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "tiny" / "student"
    recorded = run_tiny_job(run_dir, "mlflow", {})
    client = MlflowClient((run_dir / "logs" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("freekd")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny/student" and run.info.status == "FINISHED"
    names = {name for values in recorded.steps.values() for name in values}
    # the file store's names: '.' for '/' (a metric file cannot also be a folder of others)
    assert {"train.distill.freekd", "train.distill.freekd.layer0", "lr-SGD"} <= set(
        run.data.metrics
    )
    for name in names:
        history = client.get_metric_history(run.info.run_id, name.replace("/", "."))
        logged = {metric.step: metric.value for metric in history}
        expected = {step: values[name] for step, values in recorded.steps.items()}
        assert logged == pytest.approx(expected, rel=1e-6), name
    assert dict(_job_files(run_dir))["logs/mlruns/"].startswith("the MLflow runs (tracking URI")


# ---------------------------------------------------------------------------- arguments


def test_logger_args_reach_the_constructor_over_the_defaults(tmp_path):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "project" / "job"
    default = make_logger(TrainConfig(run_dir=run_dir, logger="mlflow"))
    assert default._tracking_uri == (run_dir / "logs" / "mlruns").resolve().as_uri()
    assert (default._experiment_name, default._run_name) == ("freekd", "project/job")
    store = (tmp_path / "elsewhere").as_uri()
    args = {"tracking_uri": store, "experiment_name": "detectors", "tags": {"team": "kd"}}
    given = make_logger(TrainConfig(run_dir=run_dir, logger="mlflow", logger_args=args))
    assert (given._tracking_uri, given._experiment_name, given.tags) == (
        store,
        "detectors",
        {"team": "kd"},
    )
    # save_dir alone takes the place of the default tracking URI (Lightning: file:<save_dir>)
    folder = make_logger(
        TrainConfig(run_dir=run_dir, logger="mlflow", logger_args={"save_dir": str(tmp_path)})
    )
    assert folder._tracking_uri == f"file:{tmp_path}"
    tensorboard = make_logger(
        TrainConfig(run_dir=run_dir, logger="tensorboard", logger_args={"flush_secs": 5})
    )
    assert Path(tensorboard.log_dir).parent == run_dir / "logs"


def test_the_loggers_environment_variables_are_kept(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "job"
    wandb_default = make_logger(TrainConfig(run_dir=run_dir, logger="wandb"))
    assert wandb_default._wandb_init["dir"] == str(run_dir / "logs")
    assert wandb_default._wandb_init["project"] == "freekd"
    own_dir = make_logger(
        TrainConfig(run_dir=run_dir, logger="wandb", logger_args={"dir": str(tmp_path / "w")})
    )
    assert own_dir._wandb_init["dir"] == str(tmp_path / "w")  # `dir`, not freekd's save_dir
    monkeypatch.setenv("WANDB_PROJECT", "from-environment")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))
    wandb_env = make_logger(TrainConfig(run_dir=run_dir, logger="wandb"))
    assert wandb_env._wandb_init["project"] == "from-environment"
    assert wandb_env._wandb_init["dir"] == str(tmp_path / "wandb-env")
    uri = (tmp_path / "mlflow-env").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert make_logger(TrainConfig(run_dir=run_dir, logger="mlflow"))._tracking_uri == uri


def test_a_refused_mlflow_file_store_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # the user's own setting is kept
    with pytest.raises(ValueError, match="MLFLOW_ALLOW_FILE_STORE is set to 'false': unset it"):
        make_logger(TrainConfig(run_dir=tmp_path, logger="mlflow"))


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_logger_package_names_its_extra(name, tmp_path, monkeypatch):
    for module in LOGGER_PACKAGES[name]:
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    package = LOGGER_PACKAGES[name][0]
    expected = (
        rf"^TrainConfig.logger='{name}' needs the {package} package: "
        rf"pip install 'freekd\[{name}\]', or choose TrainConfig.logger='csv'$"
    )
    with pytest.raises(ModuleNotFoundError, match=expected):
        fit(
            make_distill_module(),
            make_train_loader(Images(4), 2),
            config=config(tmp_path / "run", 1, logger=name),
        )


def test_the_command_line_says_which_extra_to_install_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(run_dir=tmp_path / "run"))
    result = CliRunner().invoke(
        app, ["train-teacher", "-c", str(recipe), "--set", "train.logger=wandb"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "freekd: error: train.logger='wandb' needs the wandb package: "
        "pip install 'freekd[wandb]', or choose train.logger='csv'"
    )
    assert "Traceback" not in result.output


def test_bad_logger_args_get_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match=r"^TrainConfig.logger_args=\['project'\] is not valid: "):
        TrainConfig(logger="wandb", logger_args=["project"])
    with pytest.raises(ValueError, match="TrainConfig.logger is None, so no logger would take"):
        TrainConfig(logger=None, logger_args={"project": "x"})
    pytest.importorskip("mlflow")
    misspelt = TrainConfig(run_dir=tmp_path, logger="mlflow", logger_args={"tracking_url": "x"})
    with pytest.raises(
        ValueError,
        match=r"^TrainConfig.logger_args: 'tracking_url' is not an argument of Lightning's "
        r"MLFlowLogger \(did you mean 'tracking_uri'\?\): remove it, or use one of ",
    ):
        make_logger(misspelt)


def test_bad_logger_args_in_a_config_name_the_key(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(run_dir=tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"train.logger_args: expected a mapping, got 3 \(int\)"):
        load_config(recipe, ["train.logger_args=3"])
    with pytest.raises(ConfigError, match="train.logger_args: set while train.logger is null"):
        load_config(recipe, ["train.logger=null", "train.logger_args={project: x}"])
    loaded = load_config(recipe, ["train.logger=wandb", "train.logger_args={offline: true}"])
    assert loaded.train.logger_args == {"offline": True}
    result = CliRunner().invoke(
        app, ["train-teacher", "-c", str(recipe), "--set", "train.logger_args=[1]"]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "freekd: error: --set train.logger_args=[1]: train.logger_args: expected a mapping, "
        "got [1] (list)"
    ]
