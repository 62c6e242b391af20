"""Let ``import mxnet`` (mxnet-cu112) find the CUDA libraries of the NVIDIA PyPI wheels, without LD_LIBRARY_PATH.

``mxnet-cu112==1.9.1``'s ``libmxnet.so`` needs libcudart.so.11.0, libcublas(Lt).so.11, libcudnn.so.8,
libnccl.so.2, libcufft.so.10, libcurand.so.10, libcusolver.so.11, libnvrtc.so.11.2, libnvToolsExt.so.1 and the
driver's libcuda.so.1. The ``gpu`` extra of setup.py installs the ``nvidia-*-cu11`` wheels, which put all but
libcuda.so.1 under ``site-packages/nvidia/<name>/lib``; the dynamic loader does not look there. This file,
copied into the venv's site-packages with a ``.pth`` line (``python -m eval.cuda_preload install``, run by
``make install`` on GPU machines), adds an import hook: the first ``import mxnet`` first loads those libraries
by path with ``RTLD_GLOBAL`` (in dependency order), so the loader finds them by soname when it maps
libmxnet.so. Nothing else is loaded at interpreter start-up; with no ``nvidia/*/lib`` directory (CPU installs)
the hook does nothing. ``INSIGHTFACE_MX_NO_CUDA_PRELOAD=1`` turns it off (e.g. to use a system CUDA).

cuDNN's own sub-libraries (libcudnn_ops_infer.so.8, ...) and libnvrtc-builtins are opened by libcudnn /
libnvrtc through their ``$ORIGIN`` RUNPATH, so they need no preloading.

Standard library only: it runs from site-packages, before the project is importable.

    python -m eval.cuda_preload install|uninstall|status|ldd
"""
import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig

MODULE_NAME = "_insightface_mx_cuda"
PTH_NAME = "insightface_mx_cuda.pth"
PTH_LINE = f"import {MODULE_NAME}; {MODULE_NAME}.install_import_hook()\n"
DISABLE_ENV = "INSIGHTFACE_MX_NO_CUDA_PRELOAD"
DRIVER_LIBRARY = "libcuda.so.1"

#: (soname, nvidia wheel sub-directory, PyPI distribution), in load order (a library after its dependencies).
CUDA_LIBRARIES = (
    ("libcudart.so.11.0", "cuda_runtime", "nvidia-cuda-runtime-cu11"),
    ("libcublasLt.so.11", "cublas", "nvidia-cublas-cu11"),
    ("libcublas.so.11", "cublas", "nvidia-cublas-cu11"),
    ("libcufft.so.10", "cufft", "nvidia-cufft-cu11"),
    ("libcurand.so.10", "curand", "nvidia-curand-cu11"),
    ("libcusolver.so.11", "cusolver", "nvidia-cusolver-cu11"),
    ("libnvrtc.so.11.2", "cuda_nvrtc", "nvidia-cuda-nvrtc-cu11"),
    ("libnvToolsExt.so.1", "nvtx", "nvidia-nvtx-cu11"),
    ("libnccl.so.2", "nccl", "nvidia-nccl-cu11"),
    ("libcudnn.so.8", "cudnn", "nvidia-cudnn-cu11"),
)

#: What the hook did in this process: soname -> path loaded, soname -> error.
STATE = {"ran": False, "loaded": {}, "errors": {}}


def wheel_library_dirs(paths=None):
    """``<entry>/nvidia/<name>/lib`` directories on ``paths`` (default ``sys.path``), in path order."""
    dirs = []
    for entry in (sys.path if paths is None else paths):
        base = os.path.join(entry or os.curdir, "nvidia")
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            lib = os.path.join(base, name, "lib")
            if os.path.isdir(lib) and lib not in dirs:
                dirs.append(lib)
    return dirs


def find_wheel_libraries(paths=None):
    """soname -> path of each of :data:`CUDA_LIBRARIES` found in the wheels (first on the path wins)."""
    found = {}
    dirs = wheel_library_dirs(paths)
    for soname, sub, _ in CUDA_LIBRARIES:
        for d in dirs:
            if os.path.basename(os.path.dirname(d)) == sub and os.path.isfile(os.path.join(d, soname)):
                found[soname] = os.path.join(d, soname)
                break
    return found


def preload(paths=None):
    """Load the wheels' CUDA libraries with RTLD_GLOBAL; never raises. Returns :data:`STATE`."""
    STATE["ran"] = True
    found = find_wheel_libraries(paths)
    for soname, _, _ in CUDA_LIBRARIES:
        path = found.get(soname) if soname not in STATE["loaded"] else None
        if not path:
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            STATE["loaded"][soname] = path
            STATE["errors"].pop(soname, None)
        except OSError as exc:
            STATE["errors"][soname] = str(exc)
    return STATE


class _PreloadFinder:
    """A meta-path finder that only watches for ``mxnet``: preloads, removes itself, lets the import go on."""

    def find_spec(self, name, path=None, target=None):
        if name == "mxnet" or name.startswith("mxnet."):
            remove_import_hook()
            preload()
        return None

    def find_module(self, name, path=None):  # pragma: no cover -- pre-3.4 protocol, kept for old tooling
        self.find_spec(name, path)
        return None


def install_import_hook():
    """Called from the ``.pth`` line at start-up: cheap (no file system access) and a no-op when disabled."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or "mxnet" in sys.modules:
        return
    if not any(isinstance(f, _PreloadFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PreloadFinder())


def remove_import_hook():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PreloadFinder)]


# ------------------------------------------------------------------------------ install / inspection
def site_dir():
    return sysconfig.get_paths()["purelib"]


def install(target=None):
    """Copy this file to ``<site-packages>/_insightface_mx_cuda.py`` and add the ``.pth`` line; return paths."""
    target = target or site_dir()
    module = os.path.join(target, MODULE_NAME + ".py")
    pth = os.path.join(target, PTH_NAME)
    shutil.copyfile(os.path.abspath(__file__), module + ".tmp")
    os.replace(module + ".tmp", module)
    with open(pth + ".tmp", "w", encoding="ascii") as f:
        f.write(PTH_LINE)
    os.replace(pth + ".tmp", pth)
    return module, pth


def uninstall(target=None):
    """Remove the hook's files from site-packages (missing files are fine); return the removed paths."""
    target = target or site_dir()
    removed = []
    for name in (PTH_NAME, MODULE_NAME + ".py"):
        path = os.path.join(target, name)
        if os.path.exists(path):
            os.remove(path)
            removed.append(path)
    return removed


def hook_installed(target=None):
    """Path of the installed ``.pth`` file, or None."""
    path = os.path.join(target or site_dir(), PTH_NAME)
    return path if os.path.isfile(path) else None


def libmxnet_path():
    """Path of the installed libmxnet.so, found without importing mxnet (None when absent)."""
    for entry in sys.path:
        path = os.path.join(entry or os.curdir, "mxnet", "libmxnet.so")
        if os.path.isfile(path):
            return path
    return None


def ldd(library=None, extra_dirs=None):
    """``ldd`` of ``library`` (default libmxnet.so) with the wheels' library directories first on the loader
    path, i.e. what the loader resolves once the hook preloaded them. Returns (resolved {soname: path},
    missing [soname]) or None when ldd or the library is unavailable."""
    library = library or libmxnet_path()
    if not library or not shutil.which("ldd"):
        return None
    dirs = wheel_library_dirs() if extra_dirs is None else list(extra_dirs)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    try:
        out = subprocess.run(["ldd", library], env=env, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    resolved, missing = {}, []
    for line in out.splitlines():
        name, arrow, where = line.strip().partition("=>")
        if not arrow:
            continue
        name, where = name.strip(), where.strip()
        if where.startswith("not found"):
            missing.append(name)
        else:
            resolved[name] = where.split(" (")[0].strip()
    return resolved, missing


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "status"
    target = argv[1] if len(argv) > 1 else None
    if command == "install":
        module, pth = install(target)
        print(f"CUDA preload hook installed: {pth} -> {module} ({len(find_wheel_libraries())} wheel libraries found)")
    elif command == "uninstall":
        for path in uninstall(target):
            print(f"removed {path}")
    elif command == "status":
        print(f"hook: {hook_installed(target) or 'not installed'}")
        for soname, path in find_wheel_libraries().items():
            print(f"  {soname}: {path}")
    elif command == "ldd":
        result = ldd()
        if result is None:
            print("ldd or libmxnet.so not available")
            return 1
        resolved, missing = result
        print(f"{libmxnet_path()}: {len(resolved)} resolved, missing: {', '.join(missing) or 'none'}")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
