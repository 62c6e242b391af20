"""Synthetic face-like identities: learnable classes and meaningful held-out verification.

An identity is a deterministic function of ``(seed, identity)``: skin, hair, eye and mouth
colours; face-oval size and position; eye height, spacing and size; nose length; mouth position
and width; and three coloured marks at identity-specific places. Each image of an identity adds
nuisance drawn from ``(seed, identity, image)``: eye openness and mouth opening (expression),
background colour, rotation (±12°), scale (0.9-1.1), shift (±5 px), global gain/bias, a linear
illumination gradient, a per-channel colour cast and Gaussian noise. Identity is therefore
recoverable only through geometry and colour layout that survive the nuisance, which is what
a face embedding has to learn; raw-pixel distance is a weak baseline.

Everything is plain numpy + OpenCV drawing (a few ms per 112x112 image).
"""
import cv2
import numpy as np

_NUISANCE = {
    "rotation_deg": 12.0,
    "scale": (0.9, 1.1),
    "shift_px": 5.0,
    "gain": (0.75, 1.25),
    "bias": 20.0,
    "gradient": 40.0,
    "cast": 10.0,
    "noise_sigma": (2.0, 7.0),
}


def identity_params(identity, seed=0):
    """Appearance parameters of ``identity`` (a dict of floats/arrays in 112x112 units)."""
    rng = np.random.default_rng([int(seed), int(identity), 0x1D])
    u = rng.uniform
    return {
        "skin": u(60, 240, 3),
        "hair": u(0, 200, 3),
        "eye": u(0, 160, 3),
        "mouth": u(60, 230, 3),
        "face_centre": (56 + u(-4, 4), 60 + u(-4, 4)),
        "face_axes": (u(28, 40), u(36, 48)),
        "hair_height": u(0.15, 0.45),
        "eye_y": u(42, 54),
        "eye_dx": u(12, 22),
        "eye_size": u(3.5, 7.5),
        "nose_len": u(8, 18),
        "mouth_y": u(76, 90),
        "mouth_w": u(8, 20),
        "marks": [(u(34, 78), u(40, 92), u(3, 7), u(0, 255, 3)) for _ in range(3)],
    }


def _render(p, rng, size, noise_bank):
    """Draw one image of identity parameters ``p`` with nuisance from ``rng``: HWC uint8 RGB, size x size.

    ``noise_bank``: (2*size, 2*size, 3) float32 standard normal; the image's noise is a random
    size x size crop of it (drawing fresh Gaussian noise per image dominated the cost).
    """
    scale = size / 112.0
    shift = 4  # sub-pixel precision of cv2 drawing: coordinates in 1/16 px
    f = 1 << shift

    def pt(x, y):
        return int(round(x * scale * f)), int(round(y * scale * f))

    def ln(v):
        return max(1, int(round(v * scale * f)))

    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(20, 236, 3).astype(np.uint8)
    cx, cy = p["face_centre"]
    ax, ay = p["face_axes"]
    aa = cv2.LINE_AA
    cv2.ellipse(img, pt(cx, cy - ay * 0.35), (ln(ax * 1.08), ln(ay * (0.75 + p["hair_height"]))), 0, 0, 360,
                p["hair"].tolist(), -1, aa, shift)
    cv2.ellipse(img, pt(cx, cy), (ln(ax), ln(ay)), 0, 0, 360, p["skin"].tolist(), -1, aa, shift)
    for mx_, my_, r, col in p["marks"]:
        cv2.circle(img, pt(mx_ + (cx - 56), my_ + (cy - 60)), ln(r), col.tolist(), -1, aa, shift)
    openness = rng.uniform(0.35, 1.0)
    for side in (-1, 1):
        ex = cx + side * p["eye_dx"]
        cv2.ellipse(img, pt(ex, p["eye_y"]), (ln(p["eye_size"] * 1.4), ln(p["eye_size"] * openness)), 0, 0, 360,
                    (245, 245, 245), -1, aa, shift)
        cv2.circle(img, pt(ex, p["eye_y"]), ln(p["eye_size"] * 0.6 * max(openness, 0.5)), p["eye"].tolist(), -1,
                   aa, shift)
    nose_top = p["eye_y"] + 6
    dark = (p["skin"] * 0.6).tolist()
    cv2.line(img, pt(cx, nose_top), pt(cx, nose_top + p["nose_len"]), dark, max(1, int(round(2 * scale))), aa, shift)
    mouth_open = rng.uniform(1.0, 5.0)
    cv2.ellipse(img, pt(cx, p["mouth_y"]), (ln(p["mouth_w"]), ln(mouth_open)), 0, 0, 360, p["mouth"].tolist(), -1,
                aa, shift)

    n = _NUISANCE
    angle = rng.uniform(-n["rotation_deg"], n["rotation_deg"])
    zoom = rng.uniform(*n["scale"])
    tx, ty = rng.uniform(-n["shift_px"], n["shift_px"], 2) * scale
    m = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, zoom)
    m[:, 2] += (tx, ty)
    img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    x = img.astype(np.float32)
    gain = np.float32(rng.uniform(*n["gain"]))
    bias = rng.uniform(-n["bias"], n["bias"])
    theta = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0, n["gradient"])
    coords = (np.arange(size, dtype=np.float32) - size / 2.0) / (size / 2.0)
    light = (np.float32(amp * np.cos(theta)) * coords[None, :] + np.float32(amp * np.sin(theta)) * coords[:, None]
             + np.float32(bias))
    cast = rng.uniform(-n["cast"], n["cast"], 3).astype(np.float32)
    oy, ox = rng.integers(0, size + 1, 2)
    noise = noise_bank[oy:oy + size, ox:ox + size] * np.float32(rng.uniform(*n["noise_sigma"]))
    x *= gain
    x += light[:, :, None]
    x += cast
    x += noise
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def render_identity(identity, count, seed=0, image_size=112, first_image=0):
    """Render ``count`` images of ``identity``.

    Parameters
    ----------
    identity : int
        Identity number; appearance depends only on ``(seed, identity)``.
    count : int
        Number of images.
    seed : int
        Dataset seed.
    image_size : int
        Side S of the square images.
    first_image : int
        Index of the first image (image k's nuisance depends on ``(seed, identity, k)``).

    Returns
    -------
    numpy.ndarray, (count, S, S, 3) uint8 RGB
    """
    p = identity_params(identity, seed)
    bank = np.random.default_rng([int(seed), int(identity), 0xB4]).standard_normal(
        (2 * image_size, 2 * image_size, 3), dtype=np.float32)
    out = np.empty((count, image_size, image_size, 3), np.uint8)
    for k in range(count):
        rng = np.random.default_rng([int(seed), int(identity), int(first_image + k), 0x5A])
        out[k] = _render(p, rng, image_size, bank)
    return out


def encode_jpeg(img_rgb, quality=95):
    """HWC uint8 RGB -> JPEG bytes (``pack_img`` default quality 95)."""
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"encode_jpeg: OpenCV could not encode a {img_rgb.shape} image")
    return enc.tobytes()


__all__ = ["identity_params", "render_identity", "encode_jpeg"]
