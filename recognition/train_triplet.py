"""``python -m recognition.train_triplet``: insightface's triplet fine-tuning (thin entry point).

parse flags -> config (:mod:`recognition.config`, trainer defaults below) -> :func:`recognition.engine.fit`
with :class:`iterators.TripletFaceImageIter` (bags embedded with the weights of the Module being trained,
as ``recognition/arcface_mxnet/train.py`` builds ``triplet_image_iter.FaceImageIter(mx_model=model)``) and
``[LossValueMetric()]``. Verification, checkpoints, resume and logging are the engine's.

Trainer defaults (HEAD ``sample_config.py`` ``loss.triplet`` + OLD ``src/train_triplet.py``): ``loss triplet``,
``per_batch_size 60``, ``lr 0.05``, ``mom 0.0``, no lr decay, ``images_per_identity 5``,
``triplet_bag_size 7200``, ``triplet_max_ap 0``; ``triplet_alpha`` comes with the loss preset
(``symbols.losses.HEAD_PRESETS``: triplet 0.3, atriplet 0.35). OLD ``--loss-type 1|2`` means
triplet|atriplet here (as in OLD ``train_triplet.py``), not the softmax codes of ``train_softmax``.
:class:`BagStatsHook` writes the mining statistics of every bag to ``<run_dir>/triplet_bags.json``.
"""
import argparse
import json
import logging
import os
import sys

import mxnet as mx

from eval.runtime import configure_threads
from iterators.formats.cli import run_cli
from iterators.formats.atomic import atomic_write_text
from iterators.triplet_iter import NoTripletsError
from recognition.config import ConfigError, build_arg_parser, parse_args
from recognition.engine import LOG_FORMAT, fit
from recognition.hooks import Hook, NonFiniteError

logger = logging.getLogger(__name__)

# insightface's triplet trainer defaults (triplet_alpha is set by the loss preset, see the module docstring)
TRIPLET_DEFAULTS = {"loss": "triplet", "per_batch_size": 60, "lr": 0.05, "mom": 0.0, "lr_steps": [],
                    "images_per_identity": 5, "triplet_bag_size": 7200, "triplet_max_ap": 0.0}
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
    """OLD ``train_triplet --loss-type 1|2`` -> ``--loss triplet|atriplet``; returns the new argv."""
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
    return rest + ["--loss", loss] if loss else rest


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
    argv = _translate_legacy_args(argv)
    return check_triplet_config(parse_args(argv, extra_defaults=TRIPLET_DEFAULTS, parser=build_parser()))


def make_triplet_iter(cfg, module, contexts):
    """``make_train_iter`` for :func:`recognition.engine.fit`: a ``TripletFaceImageIter`` mining with ``module``."""
    from iterators import TripletFaceImageIter
    from recognition import distributed
    height, width = cfg.image_shape[:2]
    dist, shard = distributed.current(), {}
    if dist.size > 1:  # every rank mines the global bags (embedded in parts + allgather), reads its batch rows
        from iterators.sharded import ShardedTripletFaceImageIter as TripletFaceImageIter
        shard = {"part_index": dist.rank, "num_parts": dist.size,
                 "allgather": lambda emb: dist.allgather(mx.nd.array(emb), name="triplet.embed").asnumpy()}
    return TripletFaceImageIter(
        batch_size=cfg.per_batch_size * len(contexts) * dist.size, data_shape=(3, height, width),
        path_imgrec=os.path.join(cfg.dataset_path, "train.rec"), shuffle=True, **shard,
        rand_mirror=bool(cfg.data_rand_mirror), cutoff=cfg.data_cutoff, ctx_num=len(contexts) * dist.size,
        images_per_identity=cfg.images_per_identity,
        triplet_params=[cfg.triplet_bag_size, cfg.triplet_alpha, cfg.triplet_max_ap], mx_model=module,
        seed=None if cfg.seed < 0 else cfg.seed, num_workers=cfg.data_workers)


class BagStatsHook(Hook):
    """Collect ``train_iter.bag_stats`` (one record per mined bag) into ``<run_dir>/triplet_bags.json``.

    The file is rewritten (atomically) at the end of every epoch and of training. The records collected so
    far are part of the resume state, so a resumed run's file lists every bag of the run once (bags the
    iterator already holds at ``before_train``, restored or replayed, are not counted again).
    """

    def __init__(self):
        self.bags = []
        self._seen = 0

    def _collect(self, trainer):
        stats = getattr(trainer.train_iter, "bag_stats", [])
        self.bags.extend(stats[self._seen:])
        self._seen = len(stats)

    def _write(self, trainer):
        self._collect(trainer)
        if not trainer.dist.is_root:  # every rank mines the same bags; rank 0 writes the file
            return
        atomic_write_text(os.path.join(trainer.run_dir, BAG_STATS_FILE), json.dumps(self.bags, indent=1) + "\n")

    def before_train(self, trainer):
        self._seen = len(getattr(trainer.train_iter, "bag_stats", []))

    def after_step(self, trainer):
        self._collect(trainer)

    def after_epoch(self, trainer):
        self._write(trainer)

    def after_train(self, trainer):
        self._write(trainer)

    def state_dict(self):
        return {"bags": self.bags}

    def load_state_dict(self, state):
        self.bags = list(state["bags"])


def train(config, hooks=None):
    """Run :func:`recognition.engine.fit` for triplet training; returns ``(FitResult, bag_stats)``.

    ``hooks``: extra :class:`recognition.hooks.Hook` instances, run after the bag statistics hook.
    """
    import metrics
    bag_hook = BagStatsHook()
    result = fit(config, make_train_iter=make_triplet_iter, metrics=[metrics.LossValueMetric()],
                 hooks=[bag_hook, *(hooks or [])])
    return result, bag_hook.bags


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m recognition.train_triplet")


def _main(argv=None):
    """Console entry point (``insightface-train-triplet``)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        config = parse_triplet_args(argv)
        configure_threads(ctx=config.ctx)
        result, bag_stats = train(config)
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
