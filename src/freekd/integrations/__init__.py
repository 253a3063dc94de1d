"""Thin adapters that run FreeKD inside other training frameworks.

Each adapter is a subpackage that imports its framework when it is imported itself, never when
``freekd`` is: ``import freekd`` stays free of them. Install the framework with the extra of the
same name (``pip install 'freekd[ultralytics]'``).

- :mod:`freekd.integrations.ultralytics`: Ultralytics YOLO detectors (stage 1
  ``tune_prompts``, stage 2 ``FreeKDTrainer``).
"""

__all__: list[str] = []
