"""``python -m recognition.train_triplet``: insightface's triplet fine-tuning (thin entry point, spec §4, §8).

parse flags -> config (:mod:`recognition.config`, trainer defaults below) -> :func:`recognition.engine.fit`
with :class:`iterators.TripletFaceImageIter` (bags embedded with the weights of the Module being trained)
and ``[LossValueMetric()]``. Verification, checkpoints, resume and logging are the engine's.

Trainer defaults (HEAD ``loss.triplet`` + OLD ``train_triplet``): ``loss triplet``, ``per_batch_size 60``,
``lr 0.05``, ``mom 0.0``, no lr decay, ``images_per_identity 5``, ``triplet_bag_size 7200``,
``triplet_alpha 0.3`` (``--loss atriplet``: 0.35), ``triplet_max_ap 0``. OLD ``--loss-type 1|2`` means
triplet|atriplet here (as in OLD ``train_triplet.py``), not the softmax codes of ``train_softmax``.
Mining statistics of every bag are written to ``<run_dir>/triplet_bags.json``.
"""
import argparse
import json
import logging
import os
import sys

from iterators.triplet_iter import NoTripletsError
from recognition.callbacks import NonFiniteError
from recognition.config import ConfigError, build_arg_parser, parse_args
from recognition.engine import LOG_FORMAT, fit

logger = logging.getLogger(__name__)

TRIPLET_DEFAULTS = {"loss": "triplet", "per_batch_size": 60, "lr": 0.05, "mom": 0.0, "lr_steps": [],
                    "images_per_identity": 5, "triplet_bag_size": 7200, "triplet_alpha": 0.3, "triplet_max_ap": 0.0}
ATRIPLET_ALPHA = 0.35  # HEAD loss.atriplet
BAG_STATS_FILE = "triplet_bags.json"

EPILOG = """examples:
  python -m recognition.train_triplet --config configs/triplet_r100_emore.py --pretrained models/r100-arcface-emore/model,1
  python -m recognition.train_triplet --config configs/triplet_orl.py --data-dir demo_run/data \\
      --pretrained demo_run/model/model,0
  python -m recognition.train_triplet --network y1 --loss atriplet --lr 0.005 --per-batch-size 150 --pretrained m,1
"""


def build_parser():
    """``train_softmax``'s flags plus insightface's triplet flags (each ``dest`` is a config key)."""
    parser = build_arg_parser("Fine-tune a face embedding with online-mined triplets (insightface train_triplet).",
                              EPILOG)
    group = parser.add_argument_group("triplet")
    group.add_argument("--images-per-identity", dest="images_per_identity", type=int, default=None,
                       help="at most this many images per identity in a bag (insightface 5)")
    group.add_argument("--triplet-bag-size", dest="triplet_bag_size", type=int, default=None,
                       help="images embedded per mining round; a multiple of per_batch_size x devices (7200)")
    group.add_argument("--triplet-alpha", dest="triplet_alpha", type=float, default=None,
                       help="margin alpha (triplet 0.3, atriplet 0.35)")
    group.add_argument("--triplet-max-ap", dest="triplet_max_ap", type=float, default=None,
                       help="skip (a,p) pairs with ||a-p||^2 above this (0 = off)")
    return parser


def _translate_legacy_args(argv):
    """OLD ``train_triplet --loss-type 1|2`` -> ``--loss triplet|atriplet``; returns (argv, loss named on CLI)."""
    from symbols.losses import LEGACY_TRIPLET_LOSS_TYPES
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--loss-type", type=int, default=None)
    pre.add_argument("--loss", default=None)
    known, rest = pre.parse_known_args(argv)
    loss = known.loss
    if known.loss_type is not None:
        if known.loss_type not in LEGACY_TRIPLET_LOSS_TYPES:
            raise ConfigError(f"--loss-type {known.loss_type}: train_triplet takes 1 (triplet) or 2 (atriplet)")
        loss = LEGACY_TRIPLET_LOSS_TYPES[known.loss_type]
    return (rest + ["--loss", loss] if loss else rest), loss


def check_triplet_config(cfg):
    """Trainer-level checks the generic config validation cannot make (per-device batch % 3 is checked there)."""
    from recognition.devices import get_contexts
    if cfg.loss not in ("triplet", "atriplet"):
        raise ConfigError(f"config key 'loss' = {cfg.loss!r}: train_triplet trains 'triplet' or 'atriplet' heads; "
                          "use python -m recognition.train_softmax for softmax/margin heads")
    if cfg.images_per_identity < 2:
        raise ConfigError(f"config key 'images_per_identity' = {cfg.images_per_identity}: must be >= 2 (an anchor "
                          "and a positive of the same identity)")
    batch_size = cfg.per_batch_size * len(get_contexts(cfg.gpus, cfg.ctx))
    if cfg.triplet_bag_size <= 0 or cfg.triplet_bag_size % batch_size:
        raise ConfigError(f"config key 'triplet_bag_size' = {cfg.triplet_bag_size}: must be a positive multiple of "
                          f"the global batch {batch_size} (per_batch_size x devices); e.g. "
                          f"{max(1, cfg.triplet_bag_size // batch_size) * batch_size}")
    if cfg.data_color:
        logger.warning("data_color=%d is ignored: insightface's triplet iterator has no colour augmentation",
                       cfg.data_color)
    return cfg


def parse_triplet_args(argv=None):
    """Config for triplet training: ``configs/base.py`` < trainer defaults < preset < ``--set`` < flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, cli_loss = _translate_legacy_args(argv)
    defaults = dict(TRIPLET_DEFAULTS)
    if cli_loss == "atriplet":
        defaults["triplet_alpha"] = ATRIPLET_ALPHA
    return check_triplet_config(parse_args(argv, extra_defaults=defaults, parser=build_parser()))


def make_triplet_iter_factory(holder=None):
    """``make_train_iter`` for :func:`recognition.engine.fit`; the iterator is also kept in ``holder``."""
    def make(cfg, module, contexts):
        from iterators import TripletFaceImageIter
        height, width = cfg.image_shape[:2]
        train_iter = TripletFaceImageIter(
            batch_size=cfg.per_batch_size * len(contexts), data_shape=(3, height, width),
            path_imgrec=os.path.join(cfg.dataset_path, "train.rec"), shuffle=True,
            rand_mirror=bool(cfg.data_rand_mirror), cutoff=cfg.data_cutoff, ctx_num=len(contexts),
            images_per_identity=cfg.images_per_identity,
            triplet_params=[cfg.triplet_bag_size, cfg.triplet_alpha, cfg.triplet_max_ap], mx_model=module,
            seed=None if cfg.seed < 0 else cfg.seed, num_workers=cfg.data_workers)
        if holder is not None:
            holder.append(train_iter)
        return train_iter
    return make


def train(config):
    """Run :func:`recognition.engine.fit` for triplet training; returns ``(FitResult, bag_stats)``."""
    import metrics
    holder = []
    try:
        result = fit(config, make_train_iter=make_triplet_iter_factory(holder), metrics=[metrics.LossValueMetric()])
    finally:
        if holder:
            holder[0].close()
    bag_stats = holder[0].bag_stats if holder else []
    with open(os.path.join(result.run_dir, BAG_STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(bag_stats, f, indent=1)
    return result, bag_stats


def main(argv=None):
    """Console entry point (``insightface-train-triplet``)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        result, bag_stats = train(parse_triplet_args(argv))
    except (ConfigError, NonFiniteError, NoTripletsError, FileNotFoundError, ValueError) as exc:
        # Configuration and data errors (bag larger than the dataset, missing train.rec, no triplets left
        # at this alpha): the message names the value and the fix, a traceback would add nothing.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    found = [s["triplets"] for s in bag_stats]
    if found:
        print(f"mined {len(found)} bag(s): triplets per bag min {min(found)} mean {sum(found) / len(found):.1f} "
              f"max {max(found)} (of {bag_stats[0]['pairs']} pairs in the first bag)")
    print(f"finished at global step {result.global_step} ({result.stopped}); run directory {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
