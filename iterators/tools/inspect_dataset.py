"""Inspect an insightface dataset directory: sizes, images-per-identity histogram, consistency, samples.

``python -m iterators.tools.inspect_dataset DIR [--prefix train] [--grid samples.png] [--decode] [--json]``

Checks (each problem is reported naming the record; the exit status is 1 when there is an error):

* ``property`` readable, and ``num_classes`` covers every label: a label outside
  ``0..num_classes-1`` is an error;
* header record: ``I0 - 1`` images (``dataset_info.py`` prints ``I0``, one too many) and
  ``I1 - I0`` identities; every identity range lies inside ``1..I0-1`` and all its images carry
  the same label (warning otherwise, since the training label is the image label);
* with ``--decode``: every image decodes to property's H x W (after ``resize_short`` as the
  iterator does).
"""
import argparse
import collections
import json
import logging
import os
import sys

import cv2
import numpy as np

from iterators.formats.cli import run_cli
from iterators import augment
from iterators.formats.recordio import FaceRecordReader, read_property


def inspect_dataset(data_dir, prefix="train", decode=False):
    """Statistics and problems of ``<data_dir>/<prefix>.rec`` + ``property``.

    Returns
    -------
    dict
        ``path_imgrec, header0, num_images, num_identities, num_classes, image_size,
        images_per_identity`` (dict count -> identities), ``label_min, label_max, errors``
        (list of str), ``warnings`` (list of str).
    """
    data_dir = os.fspath(data_dir)
    path = os.path.join(data_dir, prefix + ".rec")
    errors, warnings = [], []
    try:
        num_classes, image_size = read_property(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        errors.append(str(exc))
        num_classes, image_size = None, None
    try:
        reader = FaceRecordReader(path)
    except (OSError, ValueError) as exc:  # missing file, truncated header record, NaN header, bad index
        errors.append(str(exc))
        return {"path_imgrec": path, "header0": None, "num_images": 0, "num_identities": 0,
                "num_classes": num_classes, "image_size": image_size, "images_per_identity": {}, "label_min": None,
                "label_max": None, "errors": errors, "warnings": warnings}
    with reader:
        imgidx, labels = _readable_labels(reader, reader.imgidx, errors)
        per_identity = []
        if reader.header0 is not None:
            i0, i1 = reader.header0
            for ident, (a, b) in reader.id2range.items():
                if not (1 <= a <= b <= i0):
                    errors.append(f"{path} identity record {ident}: range [{a}, {b}) is outside the image records "
                                  f"1..{i0 - 1}")
                    continue
                per_identity.append(b - a)
                ids = _readable_labels(reader, range(a, b), [])[1] if b > a else np.zeros(0, np.int64)
                if ids.size and (ids != ids[0]).any():
                    warnings.append(f"{path} identity record {ident}: images {a}..{b - 1} carry labels "
                                    f"{sorted(set(ids.tolist()))[:5]}; training uses the image labels")
        else:
            warnings.append(f"{path} has no insightface header record (flag > 0): identity ranges unknown, "
                            "images_filter and triplet training cannot be used; counting labels instead")
            per_identity = list(collections.Counter(labels.tolist()).values())
        if num_classes is not None:
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            for k in bad[:20]:
                errors.append(f"{path} record {imgidx[k]}: label {labels[k]} is outside "
                              f"0..{num_classes - 1} (property num_classes={num_classes})")
            if bad.size > 20:
                errors.append(f"... and {bad.size - 20} more records with labels outside 0..{num_classes - 1}")
            unused = num_classes - len(set(labels.tolist()))
            if unused > 0:
                warnings.append(f"{unused} of {num_classes} classes have no image")
        if decode and image_size is not None:
            for rid in imgidx:
                try:
                    augment.decode_image(reader.read(rid)[1], image_size, f"{path} record {rid}")
                except ValueError as exc:
                    errors.append(str(exc))
        hist = dict(sorted(collections.Counter(per_identity).items()))
        return {
            "path_imgrec": path,
            "header0": reader.header0,
            "num_images": reader.num_images,
            "num_identities": len(per_identity),
            "num_classes": num_classes,
            "image_size": image_size,
            "images_per_identity": hist,
            "label_min": int(labels.min()) if labels.size else None,
            "label_max": int(labels.max()) if labels.size else None,
            "errors": errors,
            "warnings": warnings,
        }


def _readable_labels(reader, indices, errors, limit=20):
    """``(indices, labels)`` of the records whose label reads; unreadable ones (truncated .rec, an .idx offset
    past the end, NaN labels) are reported in ``errors`` (at most ``limit`` lines + a count) instead of raising."""
    indices = list(indices)
    try:
        return indices, reader.labels(indices)
    except (ValueError, KeyError):
        pass
    kept, labels, failed = [], [], []
    for rid in indices:
        try:
            labels.append(int(reader.labels([rid])[0]))
            kept.append(rid)
        except (ValueError, KeyError) as exc:
            failed.append(str(exc).strip("'\""))
    errors.extend(failed[:limit])
    if len(failed) > limit:
        errors.append(f"... and {len(failed) - limit} more unreadable records")
    return kept, np.array(labels, dtype=np.int64)


def sample_grid(data_dir, out_png, prefix="train", identities=8, images=8, seed=0):
    """Write a PNG grid: one row per identity (seeded choice), its first ``images`` images, BGR on disk."""
    path = os.path.join(os.fspath(data_dir), prefix + ".rec")
    with FaceRecordReader(path) as reader:
        if reader.id2range:
            ranges = list(reader.id2range.values())
        else:
            labels = reader.labels()
            ranges = [(int(reader.imgidx[np.flatnonzero(labels == c)[0]]), None) for c in np.unique(labels)]
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(ranges), size=min(identities, len(ranges)), replace=False).tolist())
        rows = []
        cell = None
        for c in chosen:
            a, b = ranges[c]
            ids = list(range(a, min(b, a + images))) if b is not None else [a]
            tiles = []
            for rid in ids:
                buf = np.frombuffer(reader.read(rid)[1], np.uint8)
                img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
                if img is None:
                    continue
                cell = cell or img.shape[:2]
                tiles.append(cv2.resize(img, (cell[1], cell[0])))
            if tiles:
                tiles += [np.zeros_like(tiles[0])] * (images - len(tiles))
                rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        raise ValueError(f"{path}: no decodable image for the sample grid")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    if not cv2.imwrite(os.fspath(out_png), np.concatenate(rows, axis=0)):
        raise OSError(f"could not write {out_png}")
    return out_png


def format_report(info):
    """Human-readable report of ``inspect_dataset``'s result."""
    lines = [f"dataset: {info['path_imgrec']}"]
    if info["header0"] is not None:
        i0, i1 = info["header0"]
        lines.append(f"header0: [{i0}, {i1}] -> {i0 - 1} images, {i1 - i0} identities")
    lines.append(f"images: {info['num_images']}")
    lines.append(f"identities: {info['num_identities']}")
    if info["num_classes"] is not None:
        lines.append(f"property: num_classes={info['num_classes']} image_size={info['image_size'][0]}x"
                     f"{info['image_size'][1]}")
    lines.append(f"labels: {info['label_min']}..{info['label_max']}")
    hist = info["images_per_identity"]
    if hist:
        counts = np.repeat(list(hist.keys()), list(hist.values()))
        lines.append(f"images per identity: min {counts.min()}, median {np.median(counts):g}, mean "
                     f"{counts.mean():.2f}, max {counts.max()}")
        lines.append("histogram (images per identity: identities):")
        top = max(hist.values())
        for count, n in hist.items():
            lines.append(f"  {count:6d}: {n:6d} {'#' * max(1, round(40 * n / top))}")
    for w in info["warnings"]:
        lines.append(f"WARNING: {w}")
    for e in info["errors"]:
        lines.append(f"ERROR: {e}")
    lines.append("OK" if not info["errors"] else f"{len(info['errors'])} error(s)")
    return "\n".join(lines)


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m iterators.tools.inspect_dataset")


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m iterators.tools.inspect_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="directory with <prefix>.rec/.idx and property")
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--decode", action="store_true", help="decode every image and check its size")
    parser.add_argument("--grid", default=None, help="write a PNG grid of samples here")
    parser.add_argument("--grid-identities", type=int, default=8)
    parser.add_argument("--grid-images", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    info = inspect_dataset(args.data_dir, args.prefix, args.decode)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
    if args.grid:
        sample_grid(args.data_dir, args.grid, args.prefix, args.grid_identities, args.grid_images)
        print(f"sample grid: {args.grid}")
    return 1 if info["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
