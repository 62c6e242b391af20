"""``make doctor`` / ``python -m eval.doctor``: what this install will run on.

Reports the NVIDIA driver (libcuda.so.1, ``nvidia-smi -L``), each CUDA library mxnet-cu112 needs (the path it
is loaded from, or missing), the unresolved dependencies of libmxnet.so (``ldd`` with the NVIDIA wheels'
library directories on the loader path, as the CUDA preload hook arranges), whether ``import mxnet`` works,
its build features (``mx.runtime.Features``) and the GPUs it sees, and the thread settings
(:func:`eval.runtime.configure_threads`: usable cores, the choice, what an engine worker reads back).

Runs in any venv, with or without this project installed (``make doctor VENV=/path/to/venv``), and never
fails on a broken install: it says what is broken. ``--json`` prints the report as JSON.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from eval import cuda_preload, runtime

FEATURES_SHOWN = ("CUDA", "CUDNN", "NCCL", "CUDA_RTC", "TENSORRT", "MKLDNN", "OPENMP", "BLAS_OPEN", "BLAS_MKL",
                  "LAPACK", "DIST_KVSTORE", "INT64_TENSOR_SIZE", "SIGNAL_HANDLER", "DEBUG")


def _mxnet_distributions():
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "mxnet" or name.startswith("mxnet-") or name.startswith("mxnet_"):
            found[name] = dist.version
    return found


def _loaded_path(fragment):
    """Path of a shared object mapped into this process whose file name starts with ``fragment``."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(path).startswith(fragment):
                    return path
    except OSError:
        pass
    return None


def _ldconfig():
    """soname -> path from the system loader cache (empty when ldconfig is unavailable)."""
    exe = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cache = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and "64" in m.group(2):
            cache.setdefault(m.group(1), m.group(3))
    return cache


def _system_library(soname, cache):
    for d in [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]:
        if os.path.isfile(os.path.join(d, soname)):
            return os.path.join(d, soname)
    return cache.get(soname)


def driver_report(cache):
    import ctypes
    report = {"libcuda": None, "libcuda_error": None, "nvidia_smi": None}
    try:
        ctypes.CDLL(cuda_preload.DRIVER_LIBRARY)
        report["libcuda"] = _loaded_path("libcuda.so") or _system_library(cuda_preload.DRIVER_LIBRARY, cache) or "loaded"
    except OSError as exc:
        report["libcuda_error"] = str(exc)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            report["nvidia_smi"] = (out.stdout or out.stderr).strip() or f"exit {out.returncode}"
        except (OSError, subprocess.SubprocessError) as exc:
            report["nvidia_smi"] = f"failed: {exc}"
    return report


def cuda_libraries_report(cache):
    wheels = cuda_preload.find_wheel_libraries()
    rows = []
    for soname, _, dist in cuda_preload.CUDA_LIBRARIES:
        path, origin = wheels.get(soname), "wheel"
        if not path:
            path, origin = _system_library(soname, cache), "system"
        rows.append({"library": soname, "path": path, "origin": origin if path else None, "wheel": dist})
    return rows


def mxnet_report():
    """Import mxnet (the preload hook, when installed, runs first) and describe it."""
    report = {"imported": False, "error": None, "version": None, "features": {}, "gpus": None}
    try:
        import mxnet as mx
    except Exception as exc:  # noqa: BLE001 -- an install problem to report, e.g. OSError: libcuda.so.1
        report["error"] = f"{type(exc).__name__}: {exc}"
        return report
    report.update(imported=True, version=mx.__version__, path=os.path.dirname(mx.__file__))
    try:
        feats = mx.runtime.Features()
        report["features"] = {name: feats.is_enabled(name) for name in FEATURES_SHOWN if name in feats}
    except Exception as exc:  # noqa: BLE001
        report["features_error"] = str(exc)
    try:
        report["gpus"] = mx.context.num_gpus()
    except Exception as exc:  # noqa: BLE001 -- GPU build without a usable driver raises here
        report["gpus_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc}"
    return report


def collect():
    cache = _ldconfig()
    report = {
        "python": {"executable": sys.executable, "version": platform.python_version(), "prefix": sys.prefix},
        "mxnet_distributions": _mxnet_distributions(),
        "driver": driver_report(cache),
        "cuda_libraries": cuda_libraries_report(cache),
        "preload_hook": {"installed": cuda_preload.hook_installed(),
                         "wheel_dirs": cuda_preload.wheel_library_dirs()},
    }
    lib = cuda_preload.libmxnet_path()
    result = cuda_preload.ldd(lib) if lib else None
    report["libmxnet"] = {"path": lib, "ldd_missing": None if result is None else result[1],
                          "ldd_resolved": None if result is None else len(result[0])}
    report["gpu_build"] = any(name != "mxnet" for name in report["mxnet_distributions"]) or bool(
        result and any(name.startswith("libcudart") for name in list(result[0]) + result[1]))
    report["mxnet"] = mxnet_report()
    hook_state = sys.modules.get(cuda_preload.MODULE_NAME)
    if hook_state is not None:
        report["preload_hook"].update(loaded=dict(hook_state.STATE["loaded"]), errors=dict(hook_state.STATE["errors"]))
    if report["mxnet"]["imported"]:
        setting = runtime.configure_threads(log=False)
        report["threads"] = {**setting.as_dict(), "line": setting.line(), "mxnet_openmp": runtime.mxnet_openmp_state()}
    else:
        cpus = runtime.usable_cpus(runtime.affinity_cpus(), runtime.cgroup_cpu_quota())
        choice = runtime.choose_threads(cpus, os.environ, processes=runtime.local_processes(os.environ))
        report["threads"] = {"omp_threads": choice.omp_threads, "source": choice.source, "reason": choice.reason,
                             "affinity": runtime.affinity_cpus(), "cgroup_quota": runtime.cgroup_cpu_quota(),
                             "line": f"threads: would use {choice.omp_threads} ({choice.source}: {choice.reason}); "
                                     "mxnet not importable"}
    report["verdict"] = verdict(report)
    return report


def verdict(report):
    mx_report, missing = report["mxnet"], report["libmxnet"]["ldd_missing"] or []
    cuda_missing = [row["library"] for row in report["cuda_libraries"] if not row["path"]]
    if not report["gpu_build"]:
        if mx_report["imported"]:
            threads = report["threads"]
            return (f"CPU build (mxnet {mx_report['version']}) ready; {threads['omp_threads']} OpenMP thread(s) per "
                    f"engine worker ({threads['source']}), an engine worker sees {threads.get('engine_worker_threads')}")
        return f"CPU build: import mxnet fails: {mx_report['error']}"
    if mx_report["imported"]:
        gpus = mx_report.get("gpus")
        if gpus:
            return f"GPU build (mxnet {mx_report['version']}) ready; MXNet sees {gpus} GPU(s)"
        return (f"GPU build (mxnet {mx_report['version']}) imports, but MXNet sees no GPU"
                + (f" ({mx_report['gpus_error']})" if mx_report.get("gpus_error") else "")
                + "; check the driver with nvidia-smi (training falls back to --ctx cpu)")
    if set(missing) <= {cuda_preload.DRIVER_LIBRARY} and not cuda_missing:
        return ("GPU build: every CUDA library found; only the NVIDIA driver (libcuda.so.1) is missing -- "
                "install the driver (it provides libcuda.so.1 and nvidia-smi)")
    return (f"GPU build: missing {', '.join(sorted(set(missing) | set(cuda_missing)))}; "
            "run `make install` (installs the nvidia-*-cu11 wheels and the preload hook)")


def format_report(r):
    out = [f"python        {r['python']['version']}  {r['python']['executable']}"]
    dists = ", ".join(f"{k}=={v}" for k, v in r["mxnet_distributions"].items()) or "none installed"
    out.append(f"mxnet wheel   {dists} ({'GPU' if r['gpu_build'] else 'CPU'} build)")
    drv = r["driver"]
    out.append(f"driver        libcuda.so.1: {drv['libcuda'] or 'missing'}"
               + (f"  [{drv['libcuda_error']}]" if drv["libcuda_error"] else ""))
    out.append(f"              nvidia-smi -L: {drv['nvidia_smi'] or 'nvidia-smi not found'}")
    present = [row for row in r["cuda_libraries"] if row["path"]]
    if r["gpu_build"]:
        out.append(f"CUDA libraries {len(present)} of {len(r['cuda_libraries'])} found")
    else:
        out.append(f"CUDA libraries not needed by the CPU build ({len(present)} of {len(r['cuda_libraries'])} present)")
    for row in r["cuda_libraries"] if r["gpu_build"] else []:
        where = f"{row['path']} ({row['origin']})" if row["path"] else f"missing (pip: {row['wheel']})"
        out.append(f"  {row['library']:<20} {where}")
    hook = r["preload_hook"]
    out.append(f"preload hook  {hook['installed'] or 'not installed'}")
    if "loaded" in hook:
        out.append(f"              preloaded {len(hook['loaded'])} librar{'y' if len(hook['loaded']) == 1 else 'ies'}"
                   + (f"; errors: {hook['errors']}" if hook["errors"] else ""))
    lib = r["libmxnet"]
    if lib["path"]:
        miss = "unknown (no ldd)" if lib["ldd_missing"] is None else (", ".join(lib["ldd_missing"]) or "none")
        out.append(f"libmxnet.so   {lib['path']}")
        out.append(f"              ldd: {lib['ldd_resolved']} resolved, not found: {miss}")
    else:
        out.append("libmxnet.so   not installed")
    m = r["mxnet"]
    if m["imported"]:
        on = [k for k, v in m["features"].items() if v]
        off = [k for k, v in m["features"].items() if not v]
        out.append(f"import mxnet  ok, {m['version']}  {m.get('path', '')}")
        out.append(f"features      on: {' '.join(on) or '-'}; off: {' '.join(off) or '-'}")
        out.append(f"GPUs          {m['gpus'] if m['gpus'] is not None else m.get('gpus_error')}")
    else:
        out.append(f"import mxnet  FAILED: {m['error']}")
    t = r["threads"]
    out.append(f"{t['line']}")
    if t.get("mxnet_openmp"):
        out.append(f"              mxnet OpenMP state: {t['mxnet_openmp']}")
    out.append(f"verdict       {r['verdict']}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
