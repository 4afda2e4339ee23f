"""Weight averaging (EMA, LAWA) for JAX training, and AlgoPerf submissions that use it."""

from weight_averaging import placement
from weight_averaging.averagers import Averager, EmaState, LawaState, ema, lawa

__all__ = ["Averager", "EmaState", "LawaState", "ema", "lawa", "placement"]
__version__ = "0.1.0"
