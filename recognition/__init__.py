"""Training entry points and the shared engine.

``python -m recognition.train_softmax`` / ``recognition.train_triplet`` parse flags into a config
(:mod:`recognition.config`) and call :func:`recognition.engine.fit`; :mod:`recognition.callbacks`,
:mod:`recognition.checkpoints` and :mod:`recognition.devices` hold one concern each. ``python -m
recognition.demo`` trains on the real ORL faces and verifies on held-out identities.
"""
