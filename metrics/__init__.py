"""Training metrics reading insightface's output order (insightface ``recognition/arcface_mxnet/metric.py``): :class:`AccMetric`, :class:`LossValueMetric`."""
from .accuracy import AccMetric, LossValueMetric

__all__ = ["AccMetric", "LossValueMetric"]
