"""Dataset helpers for the tests of every part (import them; they are not fixtures themselves).

``make_synthetic_dataset(tmp_path)`` builds, in well under 2 s, a directory with insightface's
``train.rec``/``train.idx``/``property`` plus a verification pack ``synthetic.bin`` and a copy
named ``lfw.bin`` (so code that looks for insightface's default targets finds one).
"""
import os
import shutil

from iterators.tools.datasets import build_synthetic


def make_synthetic_dataset(tmp_path, identities=8, images_per_identity=6, image_size=112, seed=0, pack_pairs=40,
                           holdout_identities=4, name="synthetic_data"):
    """Build a small synthetic dataset under ``tmp_path/name`` and return the directory (str).

    Training labels are 0..identities-1 with ``images_per_identity`` images each; the pack
    ``synthetic.bin`` (== ``lfw.bin``) holds ``pack_pairs`` pairs (multiple of 20) of
    ``holdout_identities`` identities never seen in training (0 = no pack).
    """
    out = os.path.join(os.fspath(tmp_path), name)
    stats = build_synthetic(out, identities, images_per_identity, seed=seed, image_size=image_size,
                            holdout_identities=holdout_identities, pairs=pack_pairs if holdout_identities else None)
    if stats["pack"]:
        shutil.copyfile(stats["pack"], os.path.join(out, "lfw.bin"))
    return out
