"""Verification on insightface `.bin` packs (docs/verification.md).

``eval.protocol``: folds, accuracy, ROC, VAL@FAR on embeddings (numpy); ``eval.inference``: ``embed`` and
``load_embedding_module`` (MXNet); ``eval.verification``: ``load_bin``, ``test``, ``python -m eval.verification``
(re-exports the other two); ``eval.build_bin``: ``python -m eval.build_bin``, packs from your own images.
"""
