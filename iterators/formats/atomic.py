"""The single atomic file writer of the project.

A file is written to a temporary name in its destination directory, flushed and fsync'd, given the
permissions ``open(path, 'w')`` would give it (``0o666 & ~umask``; ``mkstemp`` creates 0600), then
``os.replace``'d over the destination and the directory entry fsync'd. A reader, or a process killed at any
moment, therefore sees either the previous complete file or the new complete file, never a torn one.
"""
import os
import tempfile

TMP_PREFIX = ".tmp-"  # temporary files and directories start with this (leftovers of a kill are ignorable)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path):
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(directory, suffix=""):
    """Create and return an empty temporary file in ``directory`` (for writers that stage several files)."""
    fd, path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=os.fspath(directory))
    os.close(fd)
    return path


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)`` to fill a temporary file, then move it onto ``path`` atomically.

    ``write_fn`` may open ``tmp_path`` itself or hand it to a library writer (``mx.nd.save``,
    ``Module.save_optimizer_states``). Returns ``path``. On any error the temporary file is removed and the
    previous content of ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temp_path(directory, os.path.basename(path))
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return path


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))
