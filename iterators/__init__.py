"""insightface RecordIO data layer: FaceImageIter, TripletFaceImageIter, triplet mining, dataset tools.

Names are resolved lazily so that importing one tool does not import (or require) all the others.
"""
import importlib

_EXPORTS = {
    "FaceImageIter": "iterators.face_iter",
    "TripletFaceImageIter": "iterators.triplet_iter",
    "pick_triplets": "iterators.triplet_mining",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'iterators' has no attribute {name!r}")
