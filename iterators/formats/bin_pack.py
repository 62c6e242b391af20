"""insightface verification-pack (`<name>.bin`) format: one writer and one safe reader.

A pack is ``pickle.dump((bins, issame_list))`` where ``bins`` holds 2N encoded images (pair i is
``bins[2i], bins[2i+1]``) and ``issame_list`` holds N booleans (insightface ``src/eval/verification.py`` ``load_bin``, commit 9fc3cc9c; ``src/data/lfw2pack.py``). Packs in the wild were
written by Python 2 (``str`` payloads, read back with ``encoding='bytes'``) and by Python 3 (``bytes``,
or the ``np.ndarray`` returned by ``cv2.imencode``).

A ``.bin`` is a pickle, and ``pickle.load`` runs whatever callable the file names. ``read_bin`` uses
a restricted unpickler that resolves only the handful of globals real packs use (numpy array
reconstruction and ``_codecs.encode`` for protocol-2 bytes), so a malicious pack fails instead of
executing code. Both the data layer (dataset tools) and ``eval`` use this module.
"""
import io
import os
import pickle
import numpy as np

from iterators.formats.atomic import atomic_write, check_output_file

# (module, name) pairs a genuine pack may reference. numpy 2 writes `numpy._core`; numpy 1.x
# reads the same objects from `numpy.core`.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
}


class PackFormatError(ValueError):
    """A `.bin` pack that is not a valid insightface verification pack (message says why)."""


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allow-list (raised before anything is called)."""


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode`` that only performs what protocol-2 ``bytes`` need.

    Python 3 pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(<latin-1 str>, 'latin1')``;
    any other codec (compression, rot13, ...) is refused instead of being looked up.
    """
    if encoding.lower().replace("-", "").replace("_", "") != "latin1" or not isinstance(obj, str):
        raise _RefusedGlobal(
            f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}): packs only use latin1")
    return obj.encode("latin1", errors)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _RefusedGlobal(
                f"refusing to load global '{module}.{name}': a verification pack only contains "
                "encoded images and booleans (this file may be malicious or not a .bin pack)")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core", 1)
        return super().find_class(module, name)


def _unpickle(raw, path):
    """Unpickle ``raw`` with the restricted unpickler; Python-2 ``str`` payloads come back as bytes."""
    try:
        try:
            return _RestrictedUnpickler(io.BytesIO(raw)).load()
        except UnicodeDecodeError:
            # Python-2 packs store images as `str` (BINSTRING opcodes); the default ASCII decoding
            # fails on JPEG bytes, so read them as raw bytes like insightface HEAD does.
            return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise PackFormatError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated, not a pickle at all, or wrong object layout
        raise PackFormatError(
            f"{path}: not a readable verification pack ({type(exc).__name__}: {exc})") from None


def _to_bool(obj, index, path):
    # bool / numpy.bool_ / 0-1 integers are what builders have written; anything else (a str,
    # a float label) means the pack was assembled wrongly and 'bool(x)' would silently say True.
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)) and obj in (0, 1):
        return bool(obj)
    raise PackFormatError(f"{path}: issame[{index}] is {obj!r} ({type(obj).__name__}); expected a boolean")


def _to_bytes(obj, index, path):
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, np.ndarray):  # cv2.imencode output stored by build_eval_pack.py
        return obj.tobytes()
    if isinstance(obj, str):  # a Py2 `str` read with encoding='latin1' would land here
        return obj.encode("latin1")
    raise PackFormatError(f"{path}: image {index} is a {type(obj).__name__}, expected encoded image bytes")


def read_bin(path):
    """Read a pack safely and validate its structure.

    Returns
    -------
    bins : list of bytes, length 2N (encoded images; pair i = bins[2i], bins[2i+1])
    issame : list of bool, length N

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    PackFormatError
        Not a pickle, a pickle naming any global outside the allow-list (nothing is executed),
        not a ``(bins, issame)`` pair, an odd image count, ``len(bins) != 2 * len(issame)``,
        an image that is not bytes, or an issame entry that is not a boolean.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification pack not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    obj = _unpickle(raw, path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise PackFormatError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise PackFormatError(f"{path}: expected (list of images, list of booleans)")
    if len(bins) % 2:
        raise PackFormatError(f"{path}: {len(bins)} images is odd; a pack holds two images per pair")
    if len(bins) != 2 * len(issame):
        raise PackFormatError(
            f"{path}: {len(bins)} images but {len(issame)} issame labels; expected exactly 2 images per label")
    bins = [_to_bytes(b, i, path) for i, b in enumerate(bins)]
    return bins, [_to_bool(x, i, path) for i, x in enumerate(issame)]


def _encoded_bytes(obj, index, path):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8:  # cv2.imencode output
        return obj.tobytes()
    # bytes(int) would silently write a run of zeros; refuse anything that is not an encoded image
    raise TypeError(f"write_bin({path}): image {index} is a {type(obj).__name__}; expected encoded image "
                    "bytes (e.g. the file's content or cv2.imencode(...)[1])")


def write_bin(path, bins, issame):
    """Write ``(bins, issame)`` atomically in insightface's format (readable by upstream ``load_bin``).

    Parameters
    ----------
    path : str or os.PathLike
        Output file; written to a temporary file in the same directory, then renamed.
    bins : sequence of bytes or uint8 np.ndarray, length 2N
        Encoded images; pair i is ``(bins[2i], bins[2i+1])``. Stored as ``bytes``.
    issame : sequence of bool, length N
    """
    path = os.fspath(path)
    check_output_file(path, b"\x80", "a verification pack (.bin)")
    bins = [_encoded_bytes(b, i, path) for i, b in enumerate(bins)]
    issame = [bool(x) for x in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"write_bin({path}): {len(bins)} images for {len(issame)} pairs; need 2 per pair")
    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(path, write)
