"""Decoding and augmentation of face images, as insightface's iterators do them (insightface
``recognition/arcface_mxnet/image_iter.py``: ``FaceImageIter.next``, ``color_aug``, ``mirror_aug``,
``compress_aug``; ``triplet_image_iter.py`` ``next`` for the triplet cut-off).

Every function works on HWC RGB numpy arrays. Random decisions are split from their application
(``draw_*`` take a ``numpy.random.Generator`` and return plain parameters; ``apply_*`` are
deterministic), so an iterator can draw all decisions in one seeded thread and apply them in worker
threads with identical results for any number of workers. The one-call forms (``color_jitter``,
``cutoff``, ``random_mirror``) draw and apply.
"""

import threading

import cv2
import numpy as np

# ITU-R BT.601 luma weights used by MXNet's ColorJitterAug (contrast and saturation).
GRAY_COEF = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_GRAY_COEF64 = [float(v) for v in GRAY_COEF]
# insightface: ColorJitterAug(brightness=0.125, contrast=0.125, saturation=0.125).
COLOR_JITTER = 0.125
# insightface's JPEG re-compression quality range, random.randint(2, 20) (both ends inclusive).
JPEG_QUALITY_RANGE = (2, 20)


class ImageDecodeError(ValueError):
    """An encoded image that cannot be decoded (corrupt or not an image)."""


def decode_image(payload, image_size, where="image"):
    """Decode an encoded image to HWC uint8 RGB, resizing like insightface's ``FaceImageIter``.

    Parameters
    ----------
    payload : bytes
        Encoded image (JPEG/PNG/...).
    image_size : (int, int)
        Target (H, W).
    where : str
        Name of the record, used in error messages (e.g. ``"train.rec record 17"``).

    Returns
    -------
    numpy.ndarray, (H, W, 3) uint8, RGB
        ``mx.image.imdecode`` gives RGB; when the decoded height differs from H the image goes
        through ``mx.image.resize_short(img, H)`` (shorter side -> H keeping the aspect ratio,
        integer division, bicubic) exactly as upstream does.

    Raises
    ------
    ImageDecodeError
        The payload does not decode.
    ValueError
        The (possibly resized) image is not H x W (names the record and both sizes).
    """
    # resize_short works on each channel alone, so converting after it gives the same pixels (tested)
    return cv2.cvtColor(decode_bgr(payload, image_size, where), cv2.COLOR_BGR2RGB)


def resize_short(img, size):
    """``mx.image.resize_short(img, size)`` with its default interp=2 (bicubic).

    The shorter side becomes ``size``; the other is ``size * long // short`` (integer division).
    """
    h, w = img.shape[:2]
    if h > w:
        new_h, new_w = size * h // w, size
    else:
        new_h, new_w = size, size * w // h
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)


def mirror(img):
    """Horizontal flip (``nd.flip(img, axis=1)``) of an HWC image; returns a new contiguous array.

    ``cv2.flip`` is ~50x faster than materialising the negative-stride view ``img[:, ::-1]``.
    """
    if img.ndim == 3 and img.shape[2] <= 4:  # cv2 handles up to 4 channels
        return cv2.flip(img, 1)
    return np.ascontiguousarray(img[:, ::-1])


def random_mirror(img, rng, prob=0.5):
    """Flip with probability ``prob`` (insightface: ``random.randint(0, 1) == 1``, i.e. 0.5)."""
    return mirror(img) if rng.random() < prob else img


def jpeg_compress(img, quality):
    """Re-encode an HWC uint8 RGB image as JPEG at ``quality`` (1..100) and decode it back.

    insightface does this through PIL; OpenCV's libjpeg encoder is used here (same 4:2:0 baseline
    JPEG, so the artefacts match in kind; pixel values may differ by a few levels from PIL's).
    """
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"jpeg_compress: OpenCV could not encode a {img.shape} image at quality {quality}")
    return cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def draw_color_jitter(rng, brightness=COLOR_JITTER, contrast=COLOR_JITTER, saturation=COLOR_JITTER, jpeg=False):
    """Draw the random parameters of insightface's colour augmentation (``color_jittering`` > 0).

    Returns
    -------
    dict
        ``order``: permutation of (0 brightness, 1 contrast, 2 saturation) (``RandomOrderAug``);
        ``alpha``: float64[3], ``1 + U(-r, r)`` per jitter; ``quality``: JPEG quality in 2..20 or
        None. With ``jpeg=True`` (``color_jittering > 1``) re-compression happens with
        probability 1/2, as upstream.
    """
    quality = None
    if jpeg and rng.integers(0, 2) == 1:
        quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
    ranges = np.array([brightness, contrast, saturation], dtype=np.float64)
    # rng.uniform(-ranges, ranges), spelled as Generator.uniform computes it (low + (high - low) * next_double): the
    # same numbers from the same stream, without uniform's array-broadcasting set-up (11 us of the iterator's main
    # thread per image, half of all its draws)
    low = -ranges
    alpha = 1.0 + (low + (ranges - low) * rng.random(3))
    return {"order": rng.permutation(3), "alpha": alpha, "quality": quality}


def color_jitter_affine(params, channel_sums, num_pixels):
    r"""The drawn colour jitters composed into one per-pixel affine map: (3, 4) float64 ``[A | b]``.

    Each jitter is affine in the pixel ``x`` (3 channels), given the image:

    * brightness: ``x <- a x``;
    * contrast: ``x <- a x + t``, ``t = (1 - a) * 3 * mean(x * [0.299, 0.587, 0.114])`` over all H*W*3 values
      (MXNet's ``ContrastJitterAug``), i.e. ``t = (1 - a) / (H W) * coef . S`` with ``S`` the per-channel sums of
      the image at that point;
    * saturation: ``x <- (a I + (1 - a) 1 coef^T) x`` (MXNet's ``SaturationJitterAug``: per-pixel gray).

    Composing them in ``params['order']`` gives ``jitter(x) = A x + b`` for every pixel; the channel sums the
    contrast needs follow the map exactly (``S' = A S + H W b``), so only the input's sums are needed.
    Brightness and saturation keep A in the form ``alpha I + beta 1 coef^T`` and b in the form ``c 1``, which is
    how it is computed.
    ``channel_sums``: per-channel sums of the input image (channels in ``GRAY_COEF`` order, RGB);
    ``num_pixels``: H * W. Alphas are rounded to float32 first, as MXNet's float32 augmenters use them.
    """
    # With P = 1 coef^T (P P = P, as the coefficients sum to 1) every composition of the three maps is
    # A = alpha I + beta P and b = c 1, so three scalars carry it (plain floats: numpy's per-call overhead on
    # 3 x 3 matrices, held under the GIL, cost more than the image arithmetic itself).
    gray_sum = sum(w * float(v) for w, v in zip(_GRAY_COEF64, channel_sums[:3]))  # coef . S of the input
    alphas = np.asarray(params["alpha"], dtype=np.float32).tolist()
    alpha, beta, c = 1.0, 0.0, 0.0
    for op in params["order"]:
        a = alphas[op]
        if op == 0:
            alpha, beta, c = a * alpha, a * beta, a * c
        elif op == 1:
            # coef . (current channel sums) = (alpha + beta) coef . S + H W c
            t = (1.0 - a) / num_pixels * ((alpha + beta) * gray_sum + num_pixels * c)
            alpha, beta, c = a * alpha, a * beta, a * c + t
        else:
            alpha, beta = a * alpha, a * beta + (1.0 - a) * (alpha + beta)
    w0, w1, w2 = (beta * w for w in _GRAY_COEF64)
    return np.array([[alpha + w0, w1, w2, c], [w0, alpha + w1, w2, c], [w0, w1, alpha + w2, c]], dtype=np.float64)


def apply_color_jitter(img, params, out=None):
    """Apply drawn colour parameters: optional JPEG re-compression, then the jitters in their drawn order.

    The jitters (formulas in :func:`color_jitter_affine`) are applied as the one affine map they compose to, with
    one ``cv2.transform`` per image (float32, computed from float64 coefficients); insightface applies them one
    after the other in float32 (MXNet's ``BrightnessJitterAug``/``ContrastJitterAug``/``SaturationJitterAug``),
    and the two agree to float32 rounding (relative ~1e-6). Why: the step-by-step form is a dozen short numpy
    calls per image, each releasing and re-taking the GIL; in decode threads they serialised (two threads ran
    jitter at 0.6x the speed of one). Here the work is three calls that run without the GIL (``cv2.sumElems``,
    the float32 cast, ``cv2.transform``).

    No clipping to [0, 255] (upstream does not clip). ``img``: HWC, 3 channels, uint8 or float32. Returns float32
    HWC: ``out`` when given (an H x W x 3 float32 array, overwritten), else a new array.
    """
    if params["quality"] is not None:
        img = jpeg_compress(img, params["quality"])
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"apply_color_jitter: expected an H x W x 3 image, got shape {img.shape}")
    matrix = color_jitter_affine(params, cv2.sumElems(img)[:3], img.shape[0] * img.shape[1])
    if out is None:
        out = np.empty(img.shape, dtype=np.float32)
    if img.dtype == np.float32 and img is not out:
        src = img
    else:
        src = thread_scratch("color_jitter", img.shape)
        np.copyto(src, img, casting="unsafe")
    cv2.transform(src, matrix, dst=out)
    return out


_SCRATCH = threading.local()


def thread_scratch(name, shape):
    """A float32 array of ``shape`` private to the calling thread and reused by every call with ``name``: for
    temporaries that do not outlive the caller's work on one image (a 112x112x3 float32 array is 150 KB, whose
    allocation and first touch cost more than the arithmetic done in it)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.shape != tuple(shape):
        buf = buffers[name] = np.empty(shape, dtype=np.float32)
    return buf


def color_jitter(img, rng, brightness=COLOR_JITTER, contrast=COLOR_JITTER, saturation=COLOR_JITTER, jpeg=False):
    """``ColorJitterAug(0.125, 0.125, 0.125)`` semantics (plus optional JPEG step): draw and apply."""
    return apply_color_jitter(img, draw_color_jitter(rng, brightness, contrast, saturation, jpeg))


def draw_cutoff(rng, image_size, prob=0.5):
    """Draw insightface's cutoff decision: None (no cutoff) or the square centre ``(ch, cw)``.

    With probability ``prob`` (upstream ``FaceImageIter``: 1/2; triplet mode: always, ``prob=1``)
    the centre is uniform over the pixels: ``ch ~ U{0..H-1}``, ``cw ~ U{0..W-1}``.
    """
    if prob < 1.0 and rng.random() >= prob:
        return None
    H, W = int(image_size[0]), int(image_size[1])
    return int(rng.integers(0, H)), int(rng.integers(0, W))


def apply_cutoff(img, size, centre, fill=128):
    """Fill ``img[max(0,ch-s//2):min(H,ch+s//2), max(0,cw-s//2):min(W,cw+s//2), :] = fill`` in place.

    ``centre`` is None (no-op) or ``(ch, cw)`` from ``draw_cutoff``. ``fill``: 128 in
    ``FaceImageIter``, 127.5 in the triplet iterator (use a float image then). Returns ``img``.
    """
    if centre is None or size <= 0:
        return img
    H, W = img.shape[:2]
    ch, cw = centre
    half = int(size) // 2
    img[max(0, ch - half):min(H, ch + half), max(0, cw - half):min(W, cw + half), :] = fill
    return img


def cutoff(img, size, rng, fill=128, prob=0.5):
    """Random square erase (insightface ``cutoff``): draw with ``draw_cutoff`` and apply in place."""
    return apply_cutoff(img, size, draw_cutoff(rng, img.shape[:2], prob), fill)


def to_chw_float(img, out=None):
    """HWC image -> CHW float32 (``nd.transpose(img, (2, 0, 1))``), optionally into ``out``."""
    if out is None:
        # transpose view + astype writes a fresh C-contiguous array in one pass (much faster than
        # np.ascontiguousarray(..., dtype=...) on the strided view).
        return img.transpose(2, 0, 1).astype(np.float32)
    out[...] = np.transpose(img, (2, 0, 1))
    return out


def decode_bgr(payload, image_size, where="image"):
    """:func:`decode_image` without the colour conversion: HWC uint8 **BGR** (OpenCV's order), same checks
    (``decode_image`` is this plus the conversion).

    Resizing (``resize_short``, bicubic) works on each channel independently, so
    ``cv2.cvtColor(decode_bgr(p, s), cv2.COLOR_BGR2RGB)`` equals ``decode_image(p, s)`` bitwise; the fast
    training path converts to RGB in :func:`bgr_to_chw_float` instead (one pass less).
    """
    H, W = int(image_size[0]), int(image_size[1])
    buf = np.frombuffer(payload, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise ImageDecodeError(f"{where}: {len(payload)} bytes do not decode as an image")
    if img.shape[0] != H:
        img = resize_short(img, H)
    if img.shape[0] != H or img.shape[1] != W:
        raise ValueError(
            f"{where}: image is {img.shape[0]}x{img.shape[1]} after resize_short, expected {H}x{W}; "
            "rebuild the .rec with aligned HxW faces (python -m iterators.tools.build_rec --resize H,W) or "
            "change data_shape/image_size to the size in the property file")
    return img


def bgr_to_chw_float(img, out):
    """HWC uint8 BGR -> ``out`` (3 x H x W float32, RGB), i.e. ``to_chw_float(cvtColor(img, BGR2RGB), out)``.

    ``cv2.split`` gives contiguous planes and each plane is cast into its row of ``out`` (both release the
    GIL); ~7x cheaper than ``to_chw_float`` on a fresh array (no 150 KB allocation per 112x112 image).
    """
    b, g, r = cv2.split(img)
    out[0] = r
    out[1] = g
    out[2] = b
    return out


__all__ = ["GRAY_COEF", "COLOR_JITTER", "ImageDecodeError", "decode_image", "resize_short", "mirror",
           "random_mirror", "jpeg_compress", "draw_color_jitter", "color_jitter_affine", "apply_color_jitter",
           "color_jitter",
           "draw_cutoff", "apply_cutoff", "cutoff", "to_chw_float", "decode_bgr", "bgr_to_chw_float",
           "thread_scratch"]
