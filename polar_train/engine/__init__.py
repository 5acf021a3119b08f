"""The optimisation engine: process group, optimizer, precision, clipping (see protocol.py).

``engine.torch`` and ``engine.deepspeed`` are imported lazily by ``build_engine``; this package
module only re-exports (no ``import torch`` here: importing the submodule ``torch`` would
rebind that name in this namespace).
"""

from polar_train.engine.build import build_engine
from polar_train.engine.dist import Dist, distributed
from polar_train.engine.protocol import ADAM_MOMENTS, Engine, NamedState, StepResult, resolve_precision
from polar_train.engine.schedule import lr_at

__all__ = ["ADAM_MOMENTS", "Dist", "Engine", "NamedState", "StepResult", "build_engine", "distributed", "lr_at",
           "resolve_precision"]
