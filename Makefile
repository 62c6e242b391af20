# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or refresh) the project-local virtualenv $(VENV), install the package with the
# CPU or GPU MXNet wheel (GPU when nvidia-smi sees one), then run.
# GPU installs need only the NVIDIA driver: the `gpu` extra brings the CUDA 11 / cuDNN 8 / NCCL wheels and
# `eval.cuda_preload install` adds an import hook to the venv so `import mxnet` finds them (CPU installs
# remove it). `make doctor` reports driver, CUDA libraries, MXNet build features, GPUs and threads;
# `make doctor VENV=/path/to/venv` inspects another venv without installing anything into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_run
PYTEST_ARGS ?=

MXNET_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(MXNET_EXTRA)

.PHONY: install install-dist demo test test-fast bench doctor clean

# Horovod for `--dist horovod` (opt-in; `make test` runs it so CI covers the distributed tests). Built from source
# against the venv's MXNet with Gloo (no MPI, no TF/PyTorch): ~2-9 min once, then the stamp (and pip's wheel
# cache) keep it. GPU machines: NCCL for GPU tensors (README, "Distributed training").
HOROVOD_VERSION := 0.28.1
DIST_STAMP := $(VENV)/.horovod-$(HOROVOD_VERSION)
HOROVOD_GPU_ENV := $(if $(filter gpu,$(MXNET_EXTRA)),HOROVOD_GPU_OPERATIONS=NCCL,)

install-dist: $(DIST_STAMP)

$(DIST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet "setuptools<70" wheel cffi cloudpickle psutil pyyaml packaging
	HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
	HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_CPU_OPERATIONS=GLOO $(HOROVOD_GPU_ENV) \
		$(PY) -m pip install --no-build-isolation "horovod==$(HOROVOD_VERSION)"
	$(PY) -c "import horovod.mxnet as hvd; hvd.init(); print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '$(HOROVOD_VERSION)', 'size', hvd.size())"
	touch $@

install: $(STAMP)

$(STAMP): setup.py eval/cuda_preload.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -e ".[$(MXNET_EXTRA),test,onnx]"
	$(PY) -m eval.cuda_preload $(if $(filter gpu,$(MXNET_EXTRA)),install,uninstall)
	$(PY) -c "import mxnet, numpy; print('mxnet', mxnet.__version__, 'numpy', numpy.__version__)" \
		|| { $(PY) -m eval.doctor; exit 1; }
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(PY) -m recognition.demo --output $(DEMO_DIR)

test: install install-dist
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

BENCHMARKS := bench_iterator bench_verification bench_triplet_mining bench_prelu bench_train bench_threads

bench: install
	for b in $(BENCHMARKS); do $(PY) -m benchmarks.$$b || exit 1; done

# Installs first only when $(VENV) does not exist yet (so another venv is inspected as it is).
doctor: $(if $(wildcard $(PY)),,install)
	$(PY) -m eval.doctor

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info
