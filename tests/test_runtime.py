"""eval.runtime (threads), eval.cuda_preload (GPU library hook) and eval.doctor.

The decisions are pure functions tested on tables and fake /sys/fs/cgroup trees; that the choice reaches
MXNet is proven in fresh processes (MXNet reads its thread settings when it loads), by reading
``omp_get_max_threads()`` back from inside an engine worker and by counting the threads that did the work of
a convolution loop. This process is never re-configured (conftest pins OMP_NUM_THREADS=2 for determinism).
"""
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from eval import cuda_preload, runtime

ROOT = pathlib.Path(__file__).resolve().parent.parent
THREAD_VARS = runtime.THREAD_ENV_VARS + runtime.LOCAL_SIZE_ENV_VARS
AFFINITY = len(os.sched_getaffinity(0))
CPU_BUILD = importlib.metadata.distribution("mxnet").version if any(
    (d.metadata["Name"] or "").lower() == "mxnet" for d in importlib.metadata.distributions()) else None
cpu_build_only = pytest.mark.skipif(CPU_BUILD is None, reason="checks the CPU (mxnet) install")


# ------------------------------------------------------------------------------------------ helpers
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run_python(code, env=None, timeout=180, affinity=None):
    """Run ``code`` in a fresh interpreter (repo root as cwd); return the last stdout line parsed as JSON."""
    preexec = (lambda: os.sched_setaffinity(0, affinity)) if affinity else None
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env or _clean_env(),
                         capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------ cores: cgroup + affinity
def test_cgroup_v2_quota_nested_levels_smallest_wins(tmp_path):
    root = tmp_path / "cgroup"
    _write(tmp_path / "self_cgroup", "0::/kubepods/pod1/ctr\n")
    _write(root / "kubepods" / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000\n")
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "150000 100000\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup"), str(root)) == pytest.approx(1.5)
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup"), str(root)) == pytest.approx(3.0)


def test_cgroup_v2_container_view_and_hybrid_unified_mount(tmp_path):
    root = tmp_path / "cgroup"
    # inside a container the host path of /proc/self/cgroup does not exist; the mount root holds the limit
    _write(tmp_path / "self_cgroup", "0::/system.slice/docker-abc.scope\n")
    _write(root / "cpu.max", "200000 100000\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup"), str(root)) == pytest.approx(2.0)
    hybrid = tmp_path / "hybrid"
    _write(hybrid / "unified" / "job" / "cpu.max", "50000 100000\n")
    _write(tmp_path / "self_cgroup2", "1:cpu,cpuacct:/\n0::/job\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup2"), str(hybrid)) == pytest.approx(0.5)


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    _write(tmp_path / "self_cgroup", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n2:cpuset:/\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup"), str(root)) == pytest.approx(2.5)
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup"), str(root)) is None


def test_cgroup_v1_separate_cpu_mount_and_missing_files(tmp_path):
    root = tmp_path / "cgroup"
    _write(tmp_path / "self_cgroup", "1:cpu:/\n")
    _write(root / "cpu" / "cpu.cfs_quota_us", "100000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "self_cgroup"), str(root)) == pytest.approx(1.0)
    assert runtime.cgroup_cpu_quota(str(tmp_path / "absent"), str(root)) is None
    _write(tmp_path / "v2", "0::/\n")
    _write(tmp_path / "empty" / "cpu.max", "garbage\n")
    assert runtime.cgroup_cpu_quota(str(tmp_path / "v2"), str(tmp_path / "empty")) is None


def test_cgroup_quota_of_this_machine_is_readable():
    quota = runtime.cgroup_cpu_quota()
    assert quota is None or quota > 0


@pytest.mark.parametrize("affinity, quota, expected", [
    (8, None, 8), (8, 2.0, 2), (8, 1.5, 1), (8, 0.5, 1), (2, 4.0, 2), (1, None, 1), (0, None, 1), (4, 3.99, 3),
])
def test_usable_cpus_is_affinity_capped_by_quota(affinity, quota, expected):
    assert runtime.usable_cpus(affinity, quota) == expected


# ---------------------------------------------------------------------------------------- decision
@pytest.mark.parametrize("cpus, environ, kwargs, threads, source, apply", [
    (2, {}, {}, 2, "auto", True),
    (8, {}, {"processes": 2}, 4, "auto", True),
    (8, {"MXNET_CPU_WORKER_NTHREADS": "2"}, {}, 4, "auto", True),
    (8, {}, {"workers": 3}, 2, "auto", True),
    (2, {}, {"processes": 4}, 1, "auto", True),
    (2, {"OMP_NUM_THREADS": "1"}, {}, 1, "env OMP_NUM_THREADS", False),
    (2, {"OMP_NUM_THREADS": "3,1"}, {}, 3, "env OMP_NUM_THREADS", False),
    (2, {"MXNET_OMP_MAX_THREADS": "1"}, {}, 1, "env MXNET_OMP_MAX_THREADS", False),
    (2, {"OMP_NUM_THREADS": "1"}, {"requested": 2}, 1, "env OMP_NUM_THREADS", False),
    (2, {}, {"requested": 3}, 3, "argument", True),
    (2, {"OMP_NUM_THREADS": "abc"}, {}, 2, "auto", True),
    (4, {"MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}, {}, 4, "auto", True),
])
def test_choose_threads(cpus, environ, kwargs, threads, source, apply):
    choice = runtime.choose_threads(cpus, environ, **kwargs)
    assert (choice.omp_threads, choice.source, choice.apply) == (threads, source, apply)


@pytest.mark.parametrize("ctx, expected", [
    (None, 1), ("", 1), ("cpu", 1), ("cpu:4", 4), ("cpu:x", 1), ("gpu:2", 1),
    ([type("C", (), {"device_type": "cpu"})()] * 3, 3), ([type("C", (), {"device_type": "gpu"})()] * 2, 1),
])
def test_cpu_workers_of_a_context_spec(ctx, expected):
    assert runtime.cpu_workers(ctx) == expected


@pytest.mark.parametrize("environ, expected", [
    ({}, 1), ({"HOROVOD_LOCAL_SIZE": "2"}, 2), ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4), ({"LOCAL_WORLD_SIZE": "x"}, 1),
])
def test_local_processes(environ, expected):
    assert runtime.local_processes(environ) == expected


def test_configure_threads_before_import_sets_only_omp_num_threads_and_leaves_user_vars():
    result = _run_python("""
        import json, sys
        from eval.runtime import configure_threads
        environ = {"MKL_NUM_THREADS": "1"}
        s = configure_threads(environ=environ, verify=False, log=False, affinity=6, quota=4.0)
        print(json.dumps({"environ": environ, "setting": s.as_dict(), "mxnet": "mxnet" in sys.modules}))
    """)
    setting = result["setting"]
    assert not result["mxnet"], "eval.runtime must not import mxnet by itself"
    assert result["environ"] == {"MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "4"}
    assert setting["omp_threads"] == 4 and setting["cpus"] == 4 and setting["source"] == "auto"
    assert setting["method"].startswith("env OMP_NUM_THREADS")
    assert setting["user_env"] == {"MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ reaches MXNet (fresh processes)
_PROBE = """
    import glob, json, logging, os, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    MODE = {mode!r}
    if MODE in ("after", "late", "default"):
        import mxnet as mx
    if MODE == "late":
        mx.nd.ones((4, 4)).asnumpy()          # an engine worker already started
    from eval import runtime
    setting = runtime.configure_threads(**dict({kwargs})) if MODE != "default" else None
    import mxnet as mx

    def ticks():
        out = {{}}
        for d in glob.glob("/proc/self/task/*"):
            try:
                f = open(d + "/stat").read().rsplit(")", 1)[1].split()
                out[d] = int(f[11]) + int(f[12])
            except OSError:
                pass
        return out
    x = mx.nd.random.uniform(shape=(16, 32, 56, 56)); w = mx.nd.random.uniform(shape=(32, 32, 3, 3))
    mx.nd.Convolution(x, w, kernel=(3, 3), pad=(1, 1), num_filter=32, no_bias=True).wait_to_read()
    t0 = ticks()
    for _ in range({reps}):
        y = mx.nd.Convolution(x, w, kernel=(3, 3), pad=(1, 1), num_filter=32, no_bias=True)
    mx.nd.waitall()
    t1 = ticks()
    busy = sorted((t1[k] - t0.get(k, 0) for k in t1), reverse=True)
    print(json.dumps({{"setting": setting.as_dict() if setting else None, "worker": runtime.engine_omp_threads(),
                      "state": runtime.mxnet_openmp_state(), "busy": busy[:4]}}))
"""


def _probe(mode, env=None, kwargs="", reps=8, affinity=None):
    return _run_python(_PROBE.format(mode=mode, kwargs=kwargs, reps=reps), env=env, affinity=affinity)


def _threads_that_worked(busy):
    """Threads that did at least a quarter of the busiest thread's work."""
    return sum(1 for b in busy if b >= max(1, busy[0]) * 0.25)


def test_mxnet_default_uses_half_the_cores_on_x86():
    """The bug this module fixes: MXNet 1.9.1 without thread variables takes omp_get_num_procs() / 2."""
    result = _probe("default", reps=1)
    assert result["worker"] == max(1, AFFINITY // 2)
    assert result["state"]["thread_max"] == max(1, AFFINITY // 2)


@pytest.mark.skipif(AFFINITY < 2, reason="needs two usable CPUs")
@pytest.mark.parametrize("mode", ["before", "after"])
def test_configured_threads_reach_mxnet_engine_and_do_the_work(mode):
    """Before import (env) and after import (run time): an engine worker reads back all usable cores, and a
    convolution loop is computed by that many threads."""
    result = _probe(mode)
    cpus = runtime.usable_cpus(AFFINITY, runtime.cgroup_cpu_quota())
    setting = result["setting"]
    assert setting["omp_threads"] == cpus and setting["source"] == "auto" and not setting["warning"]
    assert setting["method"].startswith("env" if mode == "before" else "runtime")
    assert result["worker"] == setting["engine_worker_threads"] == cpus
    assert _threads_that_worked(result["busy"]) >= 2, result["busy"]


@pytest.mark.skipif(AFFINITY < 2, reason="needs two usable CPUs")
def test_configure_after_the_first_operation_still_fixes_the_cpu_worker():
    result = _probe("late", reps=6)
    assert result["worker"] == result["setting"]["engine_worker_threads"] == result["setting"]["omp_threads"] >= 2
    assert _threads_that_worked(result["busy"]) >= 2, result["busy"]


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS"])
def test_user_thread_variable_is_respected(var):
    result = _probe("after", env=_clean_env(**{var: 1}), reps=4)
    setting = result["setting"]
    assert setting["omp_threads"] == 1 and setting["source"] == f"env {var}" and setting["method"] == "none"
    assert setting["user_env"] == {var: "1"}
    assert result["worker"] == 1
    assert _threads_that_worked(result["busy"]) == 1, result["busy"]


@pytest.mark.skipif(AFFINITY < 2, reason="needs two usable CPUs")
def test_affinity_of_the_process_is_respected():
    result = _probe("after", affinity={sorted(os.sched_getaffinity(0))[0]}, reps=4)
    assert result["setting"]["affinity"] == 1 and result["setting"]["omp_threads"] == 1
    assert result["worker"] == 1


def test_cpu_contexts_share_the_cores():
    result = _probe("after", kwargs="ctx='cpu:2', affinity=2, quota=None", reps=2)
    assert result["setting"]["workers"] == 2 and result["setting"]["omp_threads"] == 1
    assert result["worker"] == 1


def test_cgroup_quota_caps_the_choice_end_to_end():
    result = _probe("after", kwargs="affinity=8, quota=1.0", reps=2)
    assert result["setting"]["cpus"] == 1 and result["setting"]["omp_threads"] == 1
    assert result["worker"] == 1


# ---------------------------------------------------------------------------------------- CUDA preload
def test_wheel_library_discovery_and_failed_preload_never_raise(tmp_path):
    site = tmp_path / "site"
    _write(site / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.11.0", "not an ELF file")
    _write(site / "nvidia" / "cudnn" / "lib" / "libcudnn.so.8", "not an ELF file")
    (site / "nvidia" / "nccl").mkdir(parents=True)  # no lib/ directory
    found = cuda_preload.find_wheel_libraries([str(site)])
    assert sorted(found) == ["libcudart.so.11.0", "libcudnn.so.8"]
    assert cuda_preload.wheel_library_dirs([str(site)]) == [str(site / "nvidia" / n / "lib")
                                                            for n in ("cuda_runtime", "cudnn")]
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in cuda_preload.STATE.items()}
    try:
        state = cuda_preload.preload([str(site)])
        assert set(state["errors"]) == {"libcudart.so.11.0", "libcudnn.so.8"} and not state["loaded"]
    finally:
        cuda_preload.STATE.clear()
        cuda_preload.STATE.update(saved)


def test_hook_install_uninstall_and_preload_on_import(tmp_path):
    """The .pth hook in a site dir: does nothing at start-up, preloads the wheel libraries at ``import mxnet``
    (a stand-in library here), removes itself, and mxnet still imports."""
    site = tmp_path / "site"
    site.mkdir()
    module, pth = cuda_preload.install(str(site))
    assert pathlib.Path(pth).read_text() == cuda_preload.PTH_LINE and pathlib.Path(module).is_file()
    libz = next((p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1",
                             "/lib64/libz.so.1", "/usr/lib64/libz.so.1") if os.path.exists(p)), None)
    if libz:  # any real shared object stands in for libnvToolsExt.so.1
        lib_dir = site / "nvidia" / "nvtx" / "lib"
        lib_dir.mkdir(parents=True)
        shutil.copy(libz, lib_dir / "libnvToolsExt.so.1")
    result = _run_python(f"""
        import json, site, sys
        site.addsitedir({str(site)!r})
        import {cuda_preload.MODULE_NAME} as hook
        hooked = any(type(f).__name__ == "_PreloadFinder" for f in sys.meta_path)
        ran_before = hook.STATE["ran"]
        import mxnet
        print(json.dumps({{"hooked": hooked, "ran_before": ran_before, "state": hook.STATE,
                          "left": any(type(f).__name__ == "_PreloadFinder" for f in sys.meta_path),
                          "mxnet": mxnet.__version__}}))
    """)
    assert result["hooked"] and not result["ran_before"] and not result["left"]
    assert result["state"]["ran"] and not result["state"]["errors"]
    if libz:
        assert result["state"]["loaded"] == {"libnvToolsExt.so.1": str(site / "nvidia" / "nvtx" / "lib" /
                                                                       "libnvToolsExt.so.1")}
    assert sorted(pathlib.Path(p).name for p in cuda_preload.uninstall(str(site))) == sorted(
        [cuda_preload.PTH_NAME, cuda_preload.MODULE_NAME + ".py"])
    assert cuda_preload.hook_installed(str(site)) is None


def test_hook_is_a_no_op_when_disabled(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    cuda_preload.install(str(site))
    result = _run_python(f"""
        import json, site, sys
        site.addsitedir({str(site)!r})
        print(json.dumps(any(type(f).__name__ == "_PreloadFinder" for f in sys.meta_path)))
    """, env=_clean_env(**{cuda_preload.DISABLE_ENV: 1}))
    assert result is False


@cpu_build_only
def test_the_cpu_venv_has_no_hook_and_mxnet_links_no_cuda():
    assert cuda_preload.hook_installed() is None
    result = cuda_preload.ldd()
    if result is None:
        pytest.skip("ldd not available")
    resolved, missing = result
    assert not missing and not any(name.startswith("libcuda") for name in resolved)


# ---------------------------------------------------------------------------------------------- doctor
@cpu_build_only
def test_doctor_reports_the_cpu_install():
    out = subprocess.run([sys.executable, "-m", "eval.doctor", "--json"], cwd=ROOT, env=_clean_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["gpu_build"] is False and report["mxnet_distributions"].get("mxnet") == "1.9.1"
    assert report["mxnet"]["imported"] and report["mxnet"]["version"] == "1.9.1"
    assert report["mxnet"]["features"]["CUDA"] is False and report["mxnet"]["features"]["OPENMP"] is True
    assert report["mxnet"]["gpus"] == 0
    assert report["libmxnet"]["ldd_missing"] in ([], None)
    assert [row["library"] for row in report["cuda_libraries"]] == [r[0] for r in cuda_preload.CUDA_LIBRARIES]
    cpus = runtime.usable_cpus(AFFINITY, runtime.cgroup_cpu_quota())
    threads = report["threads"]
    assert threads["omp_threads"] == threads["engine_worker_threads"] == cpus
    assert threads["mxnet_openmp"]["thread_max"] == cpus
    assert report["verdict"].startswith("CPU build (mxnet 1.9.1) ready")
    from eval import doctor
    text = doctor.format_report(report)  # what `make doctor` prints, from the same report
    for needle in ("driver        libcuda.so.1:", "nvidia-smi -L:", "import mxnet  ok", "features      on:",
                   "GPUs          0", "threads: ", "verdict       CPU build"):
        assert needle in text, text
