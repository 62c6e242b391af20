# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or refresh) the project-local virtualenv $(VENV), install the package with the
# CPU or GPU MXNet wheel (GPU when nvidia-smi sees one), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_run
PYTEST_ARGS ?=

MXNET_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(MXNET_EXTRA)

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -e ".[$(MXNET_EXTRA),test]"
	$(PY) -c "import mxnet, numpy; print('mxnet', mxnet.__version__, 'numpy', numpy.__version__)"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(PY) -m recognition.demo --output $(DEMO_DIR)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

BENCHMARKS := bench_iterator bench_verification bench_triplet_mining bench_prelu bench_train

bench: install
	for b in $(BENCHMARKS); do $(PY) -m benchmarks.$$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info
