"""quadstep: how large should Adam's step be, given the curvature along Adam's own direction?

The pieces, each in one place:

- :mod:`quadstep.direction`: where to look (Adam's and SGD's directions).
- :mod:`quadstep.curvature`: how curved the loss is along it (BackPACK's block-diagonal products, or exact).
- :mod:`quadstep.stepsize`: how far to go (alpha* = -dᵀg / dᵀCd, clipping, fallbacks).
- :mod:`quadstep.records`: what each step did and why.
- :mod:`quadstep.optimizer`: the ``torch.optim.Optimizer`` that joins them in ``step()``
  (:mod:`quadstep.update`: the update itself), with Adam's (:mod:`quadstep.adam`) and SGD's
  (:mod:`quadstep.sgd`) directions.
- :mod:`quadstep.probe`: alpha* along the steps of any other optimizer.
"""

from .adam import QuadraticLineSearchAdam
from .curvature import CURVATURES
from .optimizer import MODES, QuadraticLineSearch
from .probe import StepProbe
from .records import History, StepRecord
from .sgd import QuadraticLineSearchSGD
from .stepsize import STATUSES

__version__ = "0.1.0"

__all__ = [
    "CURVATURES",
    "MODES",
    "STATUSES",
    "History",
    "QuadraticLineSearch",
    "QuadraticLineSearchAdam",
    "QuadraticLineSearchSGD",
    "StepProbe",
    "StepRecord",
]
