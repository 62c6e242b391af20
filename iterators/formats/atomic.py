"""The single atomic file writer of the project, its file modes, and the clean-up of killed writers' temporaries.

A file is written to a temporary name in its destination directory (``.tmp-<pid>-...``), flushed and fsync'd,
VERIFIED (its size equals what the serialiser produced, or a caller-supplied check re-reads it), given its mode,
then ``os.replace``'d over the destination and the directory entry fsync'd. A reader, or a process killed at any
moment, therefore sees either the previous complete file or the new complete file, never a torn one.

Why verify: MXNet's file stream (``mx.nd.save``) drops the error of its final flush, so on a full disk or under
``ulimit -f`` it returns normally with a truncated file; without a check that file would replace the previous good
one. Any failure raises :class:`AtomicWriteError` (an ``OSError`` naming the path and the cause: ENOSPC, file size
limit, ...), removes the temporary and leaves the destination untouched.

Modes (always ``mode & ~umask``, as ``open()`` applies the umask): :data:`PRIVATE_FILE` 0600 for datasets, configs,
checkpoints, resume states and result JSON; :data:`PRIVATE_DIR` 0700 for resume-state directories;
:data:`PUBLIC_FILE` 0644 for everything else (logs, plots, verification packs).
"""
import errno
import logging
import os
import re
import shutil
import tempfile

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # temporary files and directories start with this, then "<pid>-"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PUBLIC_FILE = 0o644
_TMP_PID_RE = re.compile(r"^\.tmp-(\d+)-")


class AtomicWriteError(OSError):
    """A file could not be written completely; the previous version of the file is untouched."""

    def __str__(self):
        return self.strerror or super().__str__()


def _last_line(text):
    """The informative line of a message (MXNetError puts a C++ traceback first and the check last)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _umask():
    """The process umask, read without changing it where /proc allows (``os.umask`` swaps are racy with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(mode):
    """``mode & ~umask``: the permissions ``open``/``mkdir`` with ``mode`` would give."""
    return mode & ~_umask()


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


def _tmp_prefix():
    return f"{TMP_PREFIX}{os.getpid()}-"


def temp_path(directory, suffix="", mode=PRIVATE_FILE):
    """Create and return an empty temporary file in ``directory`` (for writers that stage several files)."""
    fd, path = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=suffix, dir=os.fspath(directory))
    os.close(fd)
    os.chmod(path, file_mode(mode))
    return path


def temp_dir(directory, suffix="", mode=PRIVATE_DIR):
    """Create and return an empty temporary directory in ``directory`` (renamed into place by the caller)."""
    path = tempfile.mkdtemp(prefix=_tmp_prefix(), suffix=suffix, dir=os.fspath(directory))
    os.chmod(path, file_mode(mode))
    return path


def describe_os_error(exc):
    """A short cause for an OSError: ``no space left on device (ENOSPC)``, ``file size limit exceeded ...``."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return "no space left on device (ENOSPC)"
    if code == errno.EFBIG:
        return "file size limit exceeded (EFBIG: ulimit -f / RLIMIT_FSIZE)"
    if code == errno.EDQUOT:
        return "disk quota exceeded (EDQUOT)"
    if code is not None and code in errno.errorcode:
        return f"{exc.strerror or os.strerror(code)} ({errno.errorcode[code]})"
    return _last_line(exc)[:300] or type(exc).__name__


def _disk_hint(directory):
    """Why a verification may have failed when the writer reported nothing (full disk / size limit)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            return f"file size limit (ulimit -f) is {soft} bytes"
    except (ImportError, OSError, ValueError):
        pass
    try:
        st = os.statvfs(directory)
        return f"{st.f_bavail * st.f_frsize} bytes free on the device"
    except OSError:
        return "disk full or file size limit?"


def atomic_write(path, write_fn, mode=PUBLIC_FILE, verify=None, expected_size=None):
    """Call ``write_fn(tmp_path)`` to fill a temporary file, verify it, then move it onto ``path`` atomically.

    Parameters
    ----------
    write_fn : callable(tmp_path); may open the file itself or hand it to a library writer (``mx.nd.save``)
    mode : permissions before the umask (:data:`PUBLIC_FILE` 0644 or :data:`PRIVATE_FILE` 0600)
    verify : callable(tmp_path) raising when the written file is not complete (e.g. re-loads it), or None
    expected_size : int or None, the exact byte size the file must have

    Returns ``path``. On any error the temporary file is removed, ``path`` keeps its previous content and
    :class:`AtomicWriteError` names the path and the cause (KeyboardInterrupt and the like propagate as they are).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory", path)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = temp_path(directory, os.path.basename(path), mode)
    except OSError as exc:
        raise AtomicWriteError(exc.errno, f"cannot write {path}: {describe_os_error(exc)}", path) from exc
    try:
        try:
            write_fn(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            size = os.path.getsize(tmp)
            if expected_size is not None and size != expected_size:
                raise AtomicWriteError(errno.EIO, f"cannot write {path}: only {size} of {expected_size} bytes "
                                       f"reached the disk ({_disk_hint(directory)})", path)
            if verify is not None:
                try:
                    verify(tmp)
                except Exception as exc:  # noqa: BLE001 - any failure to read back means an incomplete file
                    why = _last_line(exc)[:200] or type(exc).__name__
                    raise AtomicWriteError(errno.EIO, f"cannot write {path}: the {size}-byte file written does not "
                                           f"read back ({why}; {_disk_hint(directory)})", path) from exc
            os.chmod(tmp, file_mode(mode))
            os.replace(tmp, path)
        except AtomicWriteError:
            raise
        except OSError as exc:
            raise AtomicWriteError(exc.errno, f"cannot write {path}: {describe_os_error(exc)}; the previous file "
                                   "is kept", path) from exc
        except Exception as exc:  # noqa: BLE001 - e.g. MXNetError from a library writer
            raise AtomicWriteError(errno.EIO, f"cannot write {path}: {describe_os_error(exc)} "
                                   f"({_disk_hint(directory)}); the previous file is kept", path) from exc
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
    return path


def atomic_write_bytes(path, data, mode=PUBLIC_FILE):
    """Write ``data`` (bytes) to ``path`` atomically (the size on disk is checked)."""
    data = bytes(data)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write, mode=mode, expected_size=len(data))


def atomic_write_text(path, text, mode=PUBLIC_FILE):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def check_output_file(path, magic, kind):
    """Refuse an output path that is a directory, or an existing file that is not ``kind`` (its first bytes are
    not ``magic``): a typo must not overwrite e.g. a dataset with a pack. Raises ValueError naming the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory; give a file name (e.g. {os.path.join(path, 'lfw.bin')})")
    if os.path.exists(path):
        with open(path, "rb") as f:
            head = f.read(len(magic))
        if head and head != magic:
            raise ValueError(f"output {path} exists and is not {kind}; refusing to overwrite it (remove it first or "
                             "choose another name)")


def check_output_name(name, what="--prefix"):
    """``name`` must be a plain file name (no directory part, not '.'/'..'), so that outputs stay inside their
    output directory. Returns it; ValueError otherwise."""
    text = os.fspath(name)
    if not text or text in (".", "..") or os.path.basename(text) != text or "/" in text or "\\" in text \
            or "\0" in text:
        raise ValueError(f"{what} {text!r} must be a plain file name without a directory part (outputs stay inside "
                         "the output directory)")
    return text


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(directory, recursive_dirs=()):
    """Remove ``.tmp-*`` files/directories left in ``directory`` by writers that are no longer running.

    A temporary named ``.tmp-<pid>-...`` is kept while that process lives; one without a pid (older versions) is
    removed (call this only while holding the directory's lock). ``recursive_dirs``: sub-directory names cleaned
    the same way. Returns the removed paths.
    """
    directory = os.fspath(directory)
    removed = []
    targets = [directory] + [os.path.join(directory, d) for d in recursive_dirs]
    for root in targets:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if not name.startswith(TMP_PREFIX):
                continue
            m = _TMP_PID_RE.match(name)
            if m and _pid_alive(int(m.group(1))):
                continue
            full = os.path.join(root, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                try:
                    os.unlink(full)
                except OSError:
                    continue
            removed.append(full)
    if removed:
        logger.info("removed %d temporary file(s) of killed writers in %s", len(removed), directory)
    return removed
