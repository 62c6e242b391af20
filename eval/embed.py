"""``python -m eval.embed``: face embeddings of a folder, a ``.lst`` or a ``.rec`` into one ``.npy``.

::

    python -m eval.embed --model prefix,epoch --input DIR|LIST.lst|train.rec --output feats.npy
                         [--flip] [--no-norm] [--batch-size 64] [--chunk-size 1024] [--gpu N | --cpu]

Inputs (decoded with ``mx.image.imdecode`` as RGB, exactly as ``eval.verification.load_bin`` decodes pack images;
an image whose size is not ``--image-size`` is resized with ``cv2.INTER_AREA``):

* ``DIR``: ``DIR/<identity>/...`` image files (``iterators.formats.images.scan_identity_folder``: identities in
  sorted order, label = identity index, ``path`` = the file), or image files directly in ``DIR`` (label -1);
* ``LIST.lst``: one image per line, face2rec2's ``aligned<TAB>path<TAB>label[...]`` (insightface
  ``face_preprocess.parse_lst_line``), or ``path<TAB>label``, or ``path``; relative paths are relative to the list;
* ``train.rec`` (+ ``train.idx``): every image record (``FaceRecordReader.imgidx`` order), ``path`` =
  ``train.rec#<record id>``, label = the record's label.

Outputs: ``feats.npy`` (float32, one row per embedded image, in input order) and ``feats.index.tsv``
(``row, path, label, status`` for EVERY input: ``row`` -1 and ``status`` ``skipped: <reason>`` for an image that
could not be read or decoded) and ``feats.skipped.tsv`` (``path, label, reason`` of those). Nothing is dropped
silently: the index has one line per input, and the skipped count is logged.

Embeddings come from the one embedding function, ``eval.inference.embed`` (what the verifier, the train-time
callback and the demo use) on the checkpoint cut at ``fc1_output`` by ``eval.inference.load_embedding_module``:
``--flip`` = output(image) + output(horizontal flip) (insightface ``verification.test``'s flip sum), else the
plain output; then L2-normalised (unless ``--no-norm``: raw). ``--flip`` without ``--no-norm`` gives exactly the
verifier's embeddings.

Large inputs: images are embedded in chunks of ``--chunk-size``; each finished chunk is written atomically to
``feats.npy.parts/`` with a manifest (the input list's sha256 and the options). A restarted run with the same
arguments continues after the last finished chunk (a different input or option is refused, ``--restart``
discards the parts). When all chunks are done, ``feats.npy`` and the two lists are written atomically
(``iterators.formats.atomic``) and the parts are removed. Progress (images/s) is logged per chunk.
"""
import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import NamedTuple

import cv2
import mxnet as mx
import numpy as np

from eval.inference import ModelLoadError, embed, load_embedding_module
from eval.protocol import _normalize_rows
from eval.runtime import configure_threads
from iterators.formats.atomic import atomic_write, atomic_write_text
from iterators.formats.images import IMAGE_EXTENSIONS, parse_image_size, scan_identity_folder

logger = logging.getLogger(__name__)

__all__ = ["Item", "list_inputs", "read_image", "extract", "index_path", "skipped_path", "main"]

MANIFEST_VERSION = 1


class Item(NamedTuple):
    """One input image: where it comes from (``path``; ``file.rec#id`` for a record) and its label."""
    path: str
    label: int


# ----------------------------------------------------------------------------------- inputs


def _parse_lst(path):
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(fields) >= 3 and fields[0].strip() in ("0", "1"):  # face2rec2: aligned, path, label
                img, label = fields[1], fields[2]
            elif len(fields) >= 2:
                img, label = fields[0], fields[1]
            else:
                img, label = fields[0], "-1"
            try:
                label = int(float(label))
            except ValueError:
                raise ValueError(f"{path} line {lineno}: label {label!r} is not a number") from None
            items.append(Item(img if os.path.isabs(img) else os.path.join(base, img), label))
    if not items:
        raise ValueError(f"{path}: no images listed")
    return items


def list_inputs(source):
    """The images of ``DIR``, ``LIST.lst`` or ``train.rec`` as a list of :class:`Item` (see the module doc)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        loose = sorted(f for f in os.listdir(source)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(source, f)))
        items = []
        if any(os.path.isdir(os.path.join(source, d)) for d in os.listdir(source)):
            try:
                paths, labels, _ = scan_identity_folder(source)
                items = [Item(p, int(l)) for p, l in zip(paths, labels)]
            except ValueError:
                items = []
        items = [Item(os.path.join(source, f), -1) for f in loose] + items
        if not items:
            raise ValueError(f"{source}: no images (expected DIR/<identity>/<image> or images in DIR)")
        return items
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--input {source}: no such file or directory")
    if source.endswith(".rec"):
        from iterators.formats.recordio import FaceRecordReader
        with FaceRecordReader(source) as reader:
            labels = reader.labels()
            return [Item(f"{source}#{idx}", int(label)) for idx, label in zip(reader.imgidx, labels)]
    return _parse_lst(source)


class _Reader:
    """Reads the bytes of an :class:`Item` (file, or record of one shared ``.rec`` reader)."""

    def __init__(self):
        self._recs = {}

    def read_bytes(self, item):
        if "#" in item.path and item.path.rsplit("#", 1)[0].endswith(".rec"):
            rec, idx = item.path.rsplit("#", 1)
            if rec not in self._recs:
                from iterators.formats.recordio import FaceRecordReader
                self._recs[rec] = FaceRecordReader(rec)
            return self._recs[rec].read(int(idx))[1]
        with open(item.path, "rb") as f:
            return f.read()

    def close(self):
        for reader in self._recs.values():
            reader.close()
        self._recs.clear()


def read_image(data, image_size):
    """Encoded bytes -> (H, W, 3) uint8 RGB (``mx.image.imdecode``), resized (area) to ``image_size`` if needed.

    Raises ValueError when the bytes are not a decodable image.
    """
    if not data:
        raise ValueError("empty file")
    try:
        img = mx.image.imdecode(data).asnumpy()
    except mx.base.MXNetError as exc:
        raise ValueError(f"cannot decode: {str(exc).strip().splitlines()[-1]}") from None
    height, width = image_size
    if img.shape[:2] != (height, width):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    return img


# ----------------------------------------------------------------------------------- extraction


def index_path(output):
    """``feats.npy`` -> ``feats.index.tsv``."""
    stem = output[:-4] if output.endswith(".npy") else output
    return stem + ".index.tsv"


def skipped_path(output):
    """``feats.npy`` -> ``feats.skipped.tsv``."""
    stem = output[:-4] if output.endswith(".npy") else output
    return stem + ".skipped.tsv"


def _items_digest(items):
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.path}\t{item.label}\n".encode("utf-8"))
    return h.hexdigest()


def _save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    return atomic_write(path, write)


def _embed_chunk(images, module, batch_size, flip, norm):
    """Embeddings of one chunk with ``eval.inference.embed``; L2-normalised rows unless ``norm`` is False."""
    out = embed(images, module, batch_size, flip=flip)
    feats = np.asarray(out.embeddings, dtype=np.float32)
    if norm:
        feats = _normalize_rows(feats).astype(np.float32)  # sklearn's normalize, as the verifier
    return feats, out.seconds


def extract(items, module, output, batch_size=64, image_size=(112, 112), flip=False, norm=True, chunk_size=1024,
            restart=False, identity=None):
    """Embed ``items`` with a bound ``module`` into ``output`` (+ index and skipped lists), resumably.

    Parameters
    ----------
    items : list of Item
    module : mx.mod.Module bound with data ``(batch_size, 3, H, W)`` (``load_embedding_module``)
    output : str, the ``.npy`` to write
    identity : dict or None
        What else must match for a restart to reuse finished chunks (e.g. the model prefix and epoch).

    Returns
    -------
    dict with ``embedded``, ``skipped``, ``images_per_second`` (of the chunks embedded by this call), ``dim``.
    """
    output = os.fspath(output)
    parts = output + ".parts"
    manifest = {"version": MANIFEST_VERSION, "inputs": _items_digest(items), "count": len(items),
                "chunk_size": int(chunk_size), "flip": bool(flip), "norm": bool(norm),
                "image_size": list(image_size), **(identity or {})}
    manifest_path = os.path.join(parts, "manifest.json")
    if restart and os.path.isdir(parts):
        shutil.rmtree(parts)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != manifest:
            diff = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
            raise ValueError(f"{parts} holds chunks of a different run (differs in: {', '.join(diff)}); "
                             "rerun with the same arguments to continue it, or pass --restart to discard it")
    else:
        os.makedirs(parts, exist_ok=True)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    nchunks = max(1, -(-len(items) // chunk_size))
    reader = _Reader()
    done_images, spent, dim = 0, 0.0, None
    tic = time.perf_counter()
    try:
        for c in range(nchunks):
            feats_path = os.path.join(parts, "chunk-%06d.npy" % c)
            status_path = os.path.join(parts, "chunk-%06d.json" % c)
            if os.path.isfile(feats_path) and os.path.isfile(status_path):
                continue  # finished before an interruption
            chunk = items[c * chunk_size:(c + 1) * chunk_size]
            images, status = [], []
            for item in chunk:
                try:
                    images.append(read_image(reader.read_bytes(item), image_size))
                    status.append("ok")
                except (OSError, ValueError, KeyError) as exc:
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    logger.warning("skipped %s: %s", item.path, reason)
                    status.append(f"skipped: {reason}")
            if images:
                batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)
                feats, seconds = _embed_chunk(batch, module, batch_size, flip, norm)
                spent += seconds
                dim = feats.shape[1]
            else:
                feats = np.zeros((0, dim or 0), np.float32)
            # status first: a chunk counts as finished only once its features exist (written last)
            atomic_write_text(status_path, json.dumps(status) + "\n")
            _save_npy(feats_path, feats)
            done_images += len(images)
            elapsed = time.perf_counter() - tic
            logger.info("chunk %d/%d: %d images embedded, %d skipped; %.1f images/s", c + 1, nchunks,
                        len(images), len(chunk) - len(images), done_images / max(elapsed, 1e-9))
    finally:
        reader.close()
    return _assemble(items, output, parts, nchunks, chunk_size, done_images, time.perf_counter() - tic)


def _assemble(items, output, parts, nchunks, chunk_size, done_images, elapsed):
    arrays, index_lines, skipped_lines, row = [], ["row\tpath\tlabel\tstatus"], ["path\tlabel\treason"], 0
    for c in range(nchunks):
        feats = np.load(os.path.join(parts, "chunk-%06d.npy" % c))
        with open(os.path.join(parts, "chunk-%06d.json" % c), encoding="utf-8") as f:
            status = json.load(f)
        chunk = items[c * chunk_size:(c + 1) * chunk_size]
        if len(status) != len(chunk) or feats.shape[0] != status.count("ok"):
            raise ValueError(f"{parts}: chunk {c} is inconsistent with the input list; rerun with --restart")
        if feats.shape[0]:
            arrays.append(feats)
        for item, state in zip(chunk, status):
            path = item.path.replace("\t", " ").replace("\n", " ")
            if state == "ok":
                index_lines.append(f"{row}\t{path}\t{item.label}\tok")
                row += 1
            else:
                index_lines.append(f"-1\t{path}\t{item.label}\t{state}")
                skipped_lines.append(f"{path}\t{item.label}\t{state[len('skipped: '):]}")
    dim = max((a.shape[1] for a in arrays), default=0)
    feats = np.concatenate(arrays).astype(np.float32) if arrays else np.zeros((0, dim), np.float32)
    atomic_write_text(index_path(output), "\n".join(index_lines) + "\n")
    atomic_write_text(skipped_path(output), "\n".join(skipped_lines) + "\n")
    _save_npy(output, feats)  # last: its presence means the lists beside it are complete
    shutil.rmtree(parts, ignore_errors=True)
    skipped = len(skipped_lines) - 1
    rate = done_images / elapsed if elapsed > 0 else 0.0
    logger.info("wrote %s %s (%d embedded, %d skipped: %s) and %s", output, feats.shape, feats.shape[0], skipped,
                skipped_path(output), index_path(output))
    return {"embedded": int(feats.shape[0]), "skipped": skipped, "dim": int(dim), "images_per_second": rate,
            "output": output, "index": index_path(output), "skipped_list": skipped_path(output)}


# ----------------------------------------------------------------------------------- CLI


def _context(args):
    if args.cpu or args.gpu is not None and args.gpu < 0:
        return mx.cpu()
    gpus = mx.context.num_gpus()
    if args.gpu is None:
        return mx.gpu(0) if gpus else mx.cpu()
    if args.gpu >= gpus:
        raise ModelLoadError(f"--gpu {args.gpu}: MXNet sees {gpus} GPU(s); run with --cpu")
    return mx.gpu(args.gpu)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m eval.embed", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="prefix,epoch of an MXNet checkpoint (cut at fc1_output)")
    parser.add_argument("--input", required=True, help="DIR (DIR/<identity>/<image>), LIST.lst or train.rec")
    parser.add_argument("--output", required=True, help="feats.npy (+ feats.index.tsv, feats.skipped.tsv)")
    parser.add_argument("--flip", action="store_true", help="sum the embeddings of each image and its mirror")
    parser.add_argument("--no-norm", action="store_true", help="raw embeddings (default: L2-normalised rows)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    parser.add_argument("--image-size", default="112,112", help="H,W the network takes")
    parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: GPU 0 if present, else CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU")
    parser.add_argument("--restart", action="store_true", help="discard the chunks of an interrupted run")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.chunk_size < 1:
        parser.error("--batch-size and --chunk-size must be >= 1")
    if "," not in args.model:
        parser.error("--model must be prefix,epoch")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_threads()
    try:
        prefix, epoch = args.model.rsplit(",", 1)
        image_size = parse_image_size(args.image_size)
        items = list_inputs(args.input)
        logger.info("%s: %d images", args.input, len(items))
        module = load_embedding_module(prefix, int(epoch), _context(args), args.batch_size, image_size)
        identity = {"model": os.path.abspath(prefix), "epoch": int(epoch)}
        result = extract(items, module, args.output, args.batch_size, image_size, args.flip, not args.no_norm,
                         args.chunk_size, args.restart, identity)
    except (FileNotFoundError, ModelLoadError, ValueError) as exc:
        print(f"eval.embed: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
