"""Build insightface's ``train.rec``/``train.idx``/``property`` from an image folder tree or a ``.lst`` file.

Inputs (insightface ``src/data/face2rec2.py``, ``src/common/face_preprocess.py`` ``parse_lst_line``):

* a folder tree ``DIR/<identity>/<image>`` - one sub-folder per identity, folders sorted by name,
  labels consecutive 0..C-1 (identities with fewer than ``--min-images`` images are left out, as
  ``dir2lst.py`` does with 2); images are taken as already aligned;
* a face2rec2 ``.lst`` file, tab-separated ``aligned \\t path \\t label [\\t x1 y1 x2 y2 [\\t 10 landmarks]]``
  (landmarks: five x's then five y's). ``aligned=1`` images are packed unchanged (raw bytes) when
  they already have the target size; ``aligned=0`` lines with landmarks are warped onto
  insightface's 112x112 ArcFace template with a least-squares similarity transform (Umeyama, as
  ``skimage.transform.SimilarityTransform.estimate``); ``aligned=0`` lines without landmarks are
  skipped as upstream does (and reported). Relative paths are relative to the ``.lst`` file.

``--resize H,W`` resizes images that are not H x W. Without it, such images are packed as they
are when FaceImageIter's ``resize_short`` brings them to H x W (e.g. 224x224 -> 112x112), and are
skipped and reported otherwise (the iterator would reject them). Encoding runs in a thread pool (OpenCV releases the
GIL) with progress logged every 10 %. Unreadable images are skipped, counted and listed in the
summary, never silently dropped.

CLI::

    python -m iterators.tools.build_rec --input faces/ --output data/ [--resize 112,112] [--num-thread 4]
    python -m iterators.tools.build_rec --input train.lst --output data/
"""
import argparse
import collections
import concurrent.futures
import json
import logging
import os
import sys

import cv2
import numpy as np

from iterators.formats.cli import run_cli
from iterators.formats.images import parse_image_size, scan_identity_folder
from iterators.formats.recordio import write_face_rec

logger = logging.getLogger(__name__)

# insightface's 5-point ArcFace template for 112x112 (insightface recognition/arcface_mxnet/common/face_align.py ``arcface_src``).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


class ListItem:
    """One image to pack: path, class label, aligned flag and optional 5x2 landmarks."""

    __slots__ = ("path", "label", "aligned", "landmark", "where")

    def __init__(self, path, label, aligned=True, landmark=None, where=""):
        self.path, self.label, self.aligned, self.landmark, self.where = path, label, aligned, landmark, where


def scan_folder(input_dir, min_images=1):
    """``input_dir/<identity>/...`` as ListItems (labels 0..C-1 in sorted identity order); see
    :func:`iterators.formats.images.scan_identity_folder`. Returns ``(items, identity_names)``."""
    paths, labels, names = scan_identity_folder(input_dir, min_images)
    return [ListItem(p, label, True, None, p) for p, label in zip(paths, labels)], names


def parse_lst(path):
    """Parse a face2rec2 ``.lst`` (``src/common/face_preprocess.py`` ``parse_lst_line``) -> list of ListItem (``aligned=0`` without landmarks included;
    the encoder reports them as skipped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            where = f"{path} line {lineno}"
            if len(fields) < 3:
                raise ValueError(f"{where}: {line!r} has {len(fields)} tab-separated fields; expected "
                                 "'aligned<TAB>path<TAB>label[<TAB>x1 y1 x2 y2[<TAB>10 landmarks]]'")
            try:
                aligned = int(fields[0])
                label = int(float(fields[2]))
            except ValueError:
                raise ValueError(f"{where}: aligned {fields[0]!r} and label {fields[2]!r} must be integers") from None
            landmark = None
            if len(fields) >= 17:
                try:
                    landmark = np.array([float(x) for x in fields[7:17]]).reshape(2, 5).T
                except ValueError:
                    raise ValueError(f"{where}: landmarks {fields[7:17]} are not 10 numbers") from None
            img_path = fields[1] if os.path.isabs(fields[1]) else os.path.join(base, fields[1])
            items.append(ListItem(img_path, label, bool(aligned), landmark, where))
    if not items:
        raise ValueError(f"{path}: no lines")
    return items


def similarity_transform(src, dst):
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst (Umeyama 1991).

    ``src``, ``dst``: (N, 2). Returns the 2x3 matrix M with ``dst ~= M[:, :2] @ src.T + M[:, 2]``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    U, S, Vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        sign[1, 1] = -1
    R = U @ sign @ Vt
    scale = np.trace(np.diag(S) @ sign) / s.var(0).sum()
    M = np.zeros((2, 3))
    M[:, :2] = scale * R
    M[:, 2] = mu_d - scale * R @ mu_s
    return M


def align_face(img, landmark, image_size=(112, 112)):
    """Warp ``img`` so the 5 landmarks land on the ArcFace template (``norm_crop``), border 0."""
    H, W = image_size
    template = ARCFACE_TEMPLATE.copy()
    template[:, 0] *= W / 112.0
    template[:, 1] *= H / 112.0
    M = similarity_transform(landmark, template)
    return cv2.warpAffine(img, M, (W, H), borderValue=0.0)


def loaded_size(shape, H):
    """Size FaceImageIter turns an (h, w) image into: ``resize_short(img, H)`` when h != H, else unchanged."""
    h, w = shape[:2]
    if h == H:
        return h, w
    return (H * h // w, H) if h > w else (H, H * w // h)


def encode_item(item, image_size, resize=False, quality=95, encoding=".jpg"):
    """Bytes to pack for ``item``, or raise ``ValueError`` saying why it cannot be used.

    Aligned images in JPEG/PNG are packed unchanged (face2rec2) when FaceImageIter can use them:
    H x W already, or a size its ``resize_short`` brings to H x W (e.g. 224x224 for 112x112).
    Otherwise the image is resized to H x W with ``resize=True`` (area when shrinking, bicubic when
    enlarging; the aspect ratio is not kept) and re-encoded, or rejected.
    """
    H, W = image_size
    try:
        with open(item.path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if img is None:
        raise ValueError("not a decodable image")
    if not item.aligned:
        if item.landmark is None:
            raise ValueError("aligned=0 without landmarks (skipped, as face2rec2 does)")
        img = align_face(img, item.landmark, image_size)
    elif img.shape[:2] != (H, W) and not resize:
        got = loaded_size(img.shape, H)
        if got != (H, W):
            raise ValueError(f"image is {img.shape[0]}x{img.shape[1]}: FaceImageIter would load it as "
                             f"{got[0]}x{got[1]}, not {H}x{W}; pass --resize {H},{W}")
    if (item.aligned and not (resize and img.shape[:2] != (H, W))
            and os.path.splitext(item.path)[1].lower() in (".jpg", ".jpeg", ".png")):
        return raw  # aligned, usable size, a format every reader decodes: pack unchanged (face2rec2)
    if img.shape[:2] != (H, W):
        shrink = img.shape[0] > H and img.shape[1] > W
        img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encoding == ".jpg" else []
    ok, enc = cv2.imencode(encoding, img, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode it as {encoding}")
    return enc.tobytes()


def build_rec(items, output, image_size=(112, 112), resize=False, num_thread=4, quality=95, encoding=".jpg",
              prefix="train"):
    """Encode ``items`` in parallel and write insightface's layout into ``output``.

    Returns the ``write_face_rec`` statistics plus ``skipped`` (list of ``(where, reason)``) and
    ``num_skipped``.
    """
    skipped = []
    total = len(items)
    step = max(1, total // 10)

    def encoded():
        window = max(1, int(num_thread)) * 16  # bounded look-ahead: memory stays small for any dataset size
        with concurrent.futures.ThreadPoolExecutor(max(1, int(num_thread))) as pool:
            pending = collections.deque()
            submitted = 0
            for n in range(1, total + 1):
                while submitted < total and len(pending) < window:
                    pending.append(pool.submit(encode_item, items[submitted], image_size, resize, quality, encoding))
                    submitted += 1
                item, fut = items[n - 1], pending.popleft()
                try:
                    payload = fut.result()
                except ValueError as exc:
                    skipped.append((item.where, str(exc)))
                    logger.warning("skipped %s: %s", item.where, exc)
                else:
                    yield item.label, payload
                if n % step == 0 or n == total:
                    logger.info("encoded %d/%d images (%d%%), %d skipped", n, total, 100 * n // total, len(skipped))

    if not items:
        raise ValueError(f"build_rec({output}): no images to pack")
    try:
        stats = write_face_rec(output, encoded(), image_size, prefix=prefix)
    except ValueError:
        if len(skipped) == total:
            examples = "; ".join(f"{w}: {r}" for w, r in skipped[:3])
            raise ValueError(f"build_rec({output}): all {total} images were skipped, e.g. {examples}") from None
        raise
    stats["skipped"] = skipped
    stats["num_skipped"] = len(skipped)
    return stats


def _parse_size(text):
    try:
        return parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m iterators.tools.build_rec")


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m iterators.tools.build_rec", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", required=True, help="folder tree DIR/<identity>/<image> or a face2rec2 .lst")
    parser.add_argument("--output", required=True, help="output directory for train.rec/.idx/property")
    parser.add_argument("--image-size", type=_parse_size, default=(112, 112), help="H,W written to property")
    parser.add_argument("--resize", type=_parse_size, default=None,
                        help="resize images that are not H,W to H,W (implies --image-size H,W)")
    parser.add_argument("--num-thread", type=int, default=4, help="encoding threads")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--encoding", choices=[".jpg", ".png"], default=".jpg")
    parser.add_argument("--min-images", type=int, default=1, help="folder mode: identities need this many images")
    parser.add_argument("--prefix", default="train", help="output base name (<prefix>.rec/.idx)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size = args.resize or args.image_size
    if os.path.isdir(args.input):
        items, names = scan_folder(args.input, args.min_images)
        logger.info("%s: %d identities, %d images", args.input, len(names), len(items))
    else:
        items = parse_lst(args.input)
    stats = build_rec(items, args.output, size, args.resize is not None, args.num_thread, args.quality,
                      args.encoding, args.prefix)
    print(f"wrote {stats['path_imgrec']}: {stats['num_images']} images, {stats['num_identities']} identities, "
          f"property {stats['num_classes']},{size[0]},{size[1]}")
    print(f"skipped {stats['num_skipped']} unreadable/unusable images")
    for where, reason in stats["skipped"]:
        print(f"  {where}: {reason}")
    print(json.dumps({k: v for k, v in stats.items() if k != "skipped"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
