"""Training metrics reading insightface's output order (spec §7): :class:`AccMetric`, :class:`LossValueMetric`."""
from .accuracy import AccMetric, LossValueMetric

__all__ = ["AccMetric", "LossValueMetric"]
