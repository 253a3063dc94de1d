"""FreeKD for Ultralytics YOLO detectors (extra ``freekd[ultralytics]``; Ultralytics is
AGPL-3.0 and never a dependency of ``freekd`` itself: only importing this module imports it).

Stage 1, prompts on the frozen teacher, saved with the teacher's ``Detect.f`` taps::

    from freekd.integrations.ultralytics import FreeKDTrainer, tune_prompts
    tune_prompts("teacher.pt", "data.yaml", output="prompts.safetensors", imgsz=640)

Stage 2, the student trained by Ultralytics with ``mu * FreeKDLoss`` added::

    from ultralytics import YOLO
    YOLO("yolov8n.yaml").train(trainer=FreeKDTrainer, teacher="teacher.pt",
                               prompts="prompts.safetensors", data="data.yaml", imgsz=640)

The student's ``best.pt`` is a plain Ultralytics checkpoint. :func:`write_yolo_digits` writes the
built-in digit scenes as a YOLO data set (offline). Supported Ultralytics versions:
:data:`ULTRALYTICS_REQUIREMENT`; others fail on import with one line.
"""

from ._compat import REQUIREMENT as ULTRALYTICS_REQUIREMENT
from ._compat import check_ultralytics

ULTRALYTICS_VERSION = check_ultralytics()

from .data import write_yolo_dataset, write_yolo_digits  # noqa: E402
from .models import detect_taps, load_detection_model  # noqa: E402
from .prompt_files import build_loss_from_file, read_yolo_prompt_settings  # noqa: E402
from .trainer import DISTILLATION_COLUMN, FreeKDDetectionModel, FreeKDTrainer  # noqa: E402
from .tuning import TunedPrompts, tune_prompts  # noqa: E402

__all__ = [
    "DISTILLATION_COLUMN",
    "ULTRALYTICS_REQUIREMENT",
    "ULTRALYTICS_VERSION",
    "FreeKDDetectionModel",
    "FreeKDTrainer",
    "TunedPrompts",
    "build_loss_from_file",
    "check_ultralytics",
    "detect_taps",
    "load_detection_model",
    "read_yolo_prompt_settings",
    "tune_prompts",
    "write_yolo_dataset",
    "write_yolo_digits",
]
