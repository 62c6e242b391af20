"""Image files on disk: the extensions the tools accept, the ``H,W`` size syntax, the identity-folder layout.

One folder scanner serves every tool (``build_rec`` and ``build_bin`` used to disagree: one recursed into
identity folders, the other did not, so the same tree gave different images in train.rec and in the .bin).
"""
import logging
import os

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


def parse_image_size(text):
    """``"H,W"`` (e.g. ``"112,112"``) -> ``(H, W)`` positive ints; ValueError naming the text otherwise."""
    parts = str(text).split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image size {text!r}: expected H,W with two positive integers, such as 112,112")
    return size


def scan_identity_folder(root, min_images=1):
    """List the images of ``root/<identity>/...`` (images at any depth below an identity folder).

    Identities are the sub-folders of ``root`` in sorted name order; within one, files are in sorted path
    order (``os.walk`` with sorted directories). Identities with fewer than ``min_images`` images are left
    out (logged).

    Returns
    -------
    paths : list of str
    labels : list of int, 0..C-1, the index of each path's identity in ``names``
    names : list of str, the C kept identity folder names

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist.
    ValueError
        No identity folder with at least ``min_images`` images.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder not found: {root}")
    paths, labels, names = [], [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        found = []
        for directory, subdirs, files in os.walk(folder):
            subdirs.sort()
            found.extend(os.path.join(directory, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        if len(found) < min_images:
            logger.info("identity %s left out: %d images < min_images %d", name, len(found), min_images)
            continue
        labels += [len(names)] * len(found)
        names.append(name)
        paths += found
    if not paths:
        raise ValueError(f"{root}: no identity sub-folder with >= {min_images} images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); expected DIR/<identity>/<image>")
    return paths, labels, names
