"""Build insightface verification packs (``<name>.bin``) from your own aligned face images.

Three sources (insightface's ``src/data/lfw2pack.py`` and ``build_eval_pack.py`` are gone from its tree or need a
face detector):

* ``--pairs pairs.txt --data-dir DIR``: an explicit pair list.
  ``--pairs-format lfw`` (default) is LFW's ``pairs.txt``: the first line (``10 300``) is skipped;
  ``name i j`` is a genuine pair of ``DIR/name/name_%04d.<ext>``, ``name1 i name2 j`` an impostor
  pair (as ``lfw2pack.py``). ``--pairs-format label`` is ``build_eval_pack.py``'s
  ``pairs_label.txt``: ``path1 path2 0|1`` with paths relative to ``--data-dir`` (or absolute).
  The pack keeps the file's order (LFW's file is already 10 contiguous balanced folds).
* ``--image-folder DIR``: ``DIR/<identity>/<image>`` folders; pairs are sampled by
  ``iterators.formats.pairs.sample_pairs`` (balanced genuine/impostor in ``--nfolds`` contiguous folds, seeded).
* ``--rec train.rec``: an insightface RecordIO (``iterators.formats.recordio.FaceRecordReader``); pairs are
  sampled as for a folder, over the images of ``imgidx`` with their record labels.

Images are stored as their original encoded bytes (as ``lfw2pack.py``), or, with
``--image-size H,W``, decoded, resized to exactly HxW and re-encoded (``--encode jpg|png``). Every
image is decoded once to check it, so a broken file fails here, naming the file, and not at
training time. Images must already be aligned crops: nothing here detects or aligns faces.
The pack is written with ``iterators.formats.bin_pack.write_bin`` (atomic; readable by upstream ``load_bin``).
"""
import argparse
import logging
import os
import sys

import cv2
import numpy as np

from iterators.formats.atomic import check_output_file
from iterators.formats.cli import run_cli
from iterators.formats.bin_pack import write_bin
from iterators.formats.images import parse_image_size, scan_identity_folder
from iterators.formats.pairs import read_label_pairs, read_lfw_pairs, sample_pairs

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------- encoding


class _Encoder:
    """Load/check/optionally resize one image; results cached so repeated images are done once."""

    def __init__(self, image_size=None, encode="jpg", quality=95):
        if encode not in ("jpg", "png"):
            raise ValueError(f"encode must be 'jpg' or 'png', got {encode!r}")
        self.image_size = image_size
        self.ext = "." + encode
        self.params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encode == "jpg" else []
        self.cache = {}

    def __call__(self, key, load, where):
        if key in self.cache:
            return self.cache[key]
        payload = load()
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{where}: cannot be decoded as an image")
        if self.image_size is not None:
            height, width = self.image_size
            if img.shape[:2] != (height, width):
                shrink = img.shape[0] > height or img.shape[1] > width
                img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            ok, buf = cv2.imencode(self.ext, img, self.params)
            if not ok:
                raise ValueError(f"{where}: cv2.imencode('{self.ext}') failed")
            payload = buf.tobytes()
        self.cache[key] = payload
        return payload


def _read_file(path):
    def load():
        with open(path, "rb") as f:
            return f.read()
    return load


def _encode_pairs(pairs, encoder, load_for, where_for):
    """Flatten ``pairs`` of keys into the 2N encoded images of a pack (progress logged every ~10%)."""
    bins = []
    total = 2 * len(pairs)
    step = max(1, total // 10)
    for n, key in enumerate(k for pair in pairs for k in pair):
        bins.append(encoder(key, load_for(key), where_for(key)))
        if (n + 1) % step == 0 or n + 1 == total:
            logger.info("encoded %d/%d images (%d distinct)", n + 1, total, len(encoder.cache))
    return bins


def _stats(output, issame, encoder):
    issame = [bool(s) for s in issame]
    return {"output": os.fspath(output), "pairs": len(issame), "genuine": sum(issame),
            "impostor": len(issame) - sum(issame), "images": 2 * len(issame), "distinct_images": len(encoder.cache)}


# ------------------------------------------------------------------------------- builders


def build_from_pairs(output, pairs, issame, image_size=None, encode="jpg", quality=95, skip_missing=False):
    """Write a pack from explicit ``(path1, path2)`` pairs, in the given order.

    Missing files raise ``FileNotFoundError`` naming them; ``skip_missing=True`` drops those pairs
    instead (``lfw2pack.py`` behaviour) with a warning. Returns a dict of statistics.
    """
    kept_pairs, kept_issame, missing = [], [], []
    for (p, q), same in zip(pairs, issame):
        absent = [x for x in (p, q) if not os.path.isfile(x)]
        if absent:
            missing += absent
            continue
        kept_pairs.append((p, q))
        kept_issame.append(same)
    if missing:
        if not skip_missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) of the pair list are missing, e.g. {missing[0]}; "
                                    "fix --data-dir/--ext or pass --skip-missing to drop those pairs")
        logger.warning("skipped %d pairs with missing files (e.g. %s); fold balance may be lost",
                       len(pairs) - len(kept_pairs), missing[0])
    if not kept_pairs:
        raise ValueError("no pair left to write")
    encoder = _Encoder(image_size, encode, quality)
    bins = _encode_pairs(kept_pairs, encoder, _read_file, lambda path: path)
    write_bin(output, bins, kept_issame)
    return _stats(output, kept_issame, encoder)


def build_from_labelled(output, labels, load_image, where, num_pairs, nfolds=10, seed=0, image_size=None,
                        encode="jpg", quality=95, identity_disjoint="auto"):
    """Write a pack from labelled images with ``iterators.formats.pairs.sample_pairs`` (balanced contiguous folds).

    Parameters
    ----------
    labels : sequence, length M (identity of image k)
    load_image : callable k -> encoded bytes of image k
    where : callable k -> str naming image k in error messages
    num_pairs, nfolds, seed, identity_disjoint : see ``iterators.formats.pairs.sample_pairs``
    """
    pairs, issame = sample_pairs(labels, num_pairs, nfolds=nfolds, seed=seed, identity_disjoint=identity_disjoint)
    encoder = _Encoder(image_size, encode, quality)
    bins = _encode_pairs(pairs, encoder, lambda k: (lambda: load_image(k)), where)
    write_bin(output, bins, issame)
    return _stats(output, issame, encoder)


def build_from_folder(output, root, num_pairs, **kwargs):
    """``build_from_labelled`` over ``root/<identity>/<image>``."""
    paths, labels, _ = scan_identity_folder(root)
    logger.info("%s: %d images of %d identities", root, len(paths), len(set(labels)))
    return build_from_labelled(output, labels, lambda k: _read_file(paths[k])(), lambda k: paths[k], num_pairs,
                               **kwargs)


def build_from_rec(output, path_imgrec, num_pairs, **kwargs):
    """``build_from_labelled`` over the images (``imgidx``) of an insightface ``.rec``."""
    from iterators.formats.recordio import FaceRecordReader
    reader = FaceRecordReader(path_imgrec)
    try:
        labels = reader.labels(reader.imgidx)
        logger.info("%s: %d images of %d identities", path_imgrec, len(labels), len(set(labels.tolist())))
        return build_from_labelled(output, labels, lambda k: reader.read(reader.imgidx[k])[1],
                                   lambda k: f"{path_imgrec} record {reader.imgidx[k]}", num_pairs, **kwargs)
    finally:
        reader.close()


# ------------------------------------------------------------------------------------- CLI


def _parse_size(text):
    try:
        return parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m eval.build_bin",
                                     description="Build an insightface verification pack (.bin) from aligned images.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="pair list (LFW pairs.txt, or pairs_label.txt with --pairs-format label)")
    source.add_argument("--image-folder", help="DIR/<identity>/<image>: sample balanced pairs")
    source.add_argument("--rec", help="insightface train.rec (+ .idx): sample balanced pairs")
    parser.add_argument("--output", required=True, help="output <name>.bin")
    parser.add_argument("--data-dir", default=".", help="image root of --pairs")
    parser.add_argument("--pairs-format", choices=("lfw", "label"), default="lfw")
    parser.add_argument("--ext", default="jpg", help="image extension for LFW pairs.txt names (default jpg)")
    parser.add_argument("--skip-missing", action="store_true", help="drop pairs whose files are missing (lfw2pack)")
    parser.add_argument("--num-pairs", type=int, default=6000, help="sampled pairs (multiple of 2*nfolds)")
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity-disjoint", choices=("auto", "yes", "no"), default="auto",
                        help="sampled folds use disjoint identities (like LFW's sets): auto = when possible")
    parser.add_argument("--image-size", type=_parse_size, default=None, help="resize every image to H,W")
    parser.add_argument("--encode", choices=("jpg", "png"), default="jpg", help="format when resizing")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when resizing")
    return parser


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m eval.build_bin")


def _main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    encoding = dict(image_size=args.image_size, encode=args.encode, quality=args.quality)
    sampling = dict(nfolds=args.nfolds, seed=args.seed,
                    identity_disjoint={"auto": "auto", "yes": True, "no": False}[args.identity_disjoint], **encoding)
    try:
        check_output_file(args.output, b"\x80", "a verification pack (.bin)")  # before any work is done
        if args.pairs:
            if args.pairs_format == "lfw":
                pairs, issame = read_lfw_pairs(args.pairs, args.data_dir, args.ext)
            else:
                pairs, issame = read_label_pairs(args.pairs, args.data_dir)
            stats = build_from_pairs(args.output, pairs, issame, skip_missing=args.skip_missing, **encoding)
        elif args.image_folder:
            stats = build_from_folder(args.output, args.image_folder, args.num_pairs, **sampling)
        else:
            stats = build_from_rec(args.output, args.rec, args.num_pairs, **sampling)
    except (FileNotFoundError, ValueError) as exc:
        print(f"eval.build_bin: error: {exc}", file=sys.stderr)
        return 1
    print("wrote {output}: {pairs} pairs ({genuine} genuine, {impostor} impostor), "
          "{distinct_images} distinct images".format(**stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
