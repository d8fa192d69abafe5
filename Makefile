# fastp2phd: `make test` is the whole set-up on a fresh machine.
#
# TORCH_SPEC pins the torch build the venv gets. The default is the CPU wheel this
# project is developed with; CUDA users override it, e.g.
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

PIP := $(VENV)/bin/python -m pip
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastp2phd-installed
TEST_STAMP := $(VENV)/.fastp2phd-test-installed

.PHONY: install test demo bench info gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77" wheel ninja

# The package (and the extension, rebuilt when the build or the C++/CUDA sources change).
# numpy goes in with torch: the extension's build imports torch, which wants numpy.
$(STAMP): $(VENV)/bin/python setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)" numpy
	$(PIP) install --no-build-isolation -e ".[progress]"
	touch $@

# What the tests need on top (pyproject's "test" extra: pytest, onnxruntime, scikit-image, playwright, ...),
# without building the package again.
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PIP) install $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))")
	touch $@

install: $(STAMP)

# Two processes: the Triton kernels run in Triton's interpreter on CPU tensors, which
# needs TRITON_INTERPRET=1 before Triton is imported and breaks torch.compile. They run side by
# side: the interpreter is one thread of Python (9 minutes), and the main suite (14 minutes) keeps
# about one core of two busy, so the interpreter runs niced, on the time the main suite leaves.
# Its report is printed when both are done.
test: $(TEST_STAMP)
	$(PY) -m fastp2phd info
	@log=$$(mktemp); \
	TRITON_INTERPRET=1 nice -n 10 $(PY) -m pytest tests/interpreter $(PYTEST_ARGS) > $$log 2>&1 & interpreter=$$!; \
	trap 'kill $$interpreter 2>/dev/null' INT TERM; \
	$(PY) -m pytest $(PYTEST_ARGS); suite=$$?; \
	wait $$interpreter; interpreted=$$?; \
	echo "=== TRITON_INTERPRET=1 $(PY) -m pytest tests/interpreter $(PYTEST_ARGS)"; cat $$log; rm -f $$log; \
	test $$suite = 0 && test $$interpreted = 0

# Trains a small pix2pixHD with instance features on built-in synthetic scenes (measured: 10 to
# 27 minutes on 2 busy CPU cores, see the README), clusters styles, and writes demo_output/web/index.html.
# An earlier demo_output is kept: `make demo DEMO_ARGS=--overwrite` replaces it.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m fastp2phd demo --out demo_output $(DEMO_ARGS)

# The CPU benchmark suites (about 25 minutes on 2 cores): results in bench/results/, report in bench/REPORT.md.
bench: $(TEST_STAMP)
	$(PIP) install "pytest-benchmark" "matplotlib" "scikit-image"
	$(PY) -m pytest bench -p no:cacheprovider -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

info: $(STAMP)
	$(PY) -m fastp2phd info

# On a machine with an NVIDIA GPU and PyTorch/Triton already installed (no venv):
# build, GPU tests, kernel benchmarks; results in OUT.
OUT ?= bench/results/gpu-check
gpu-check:
	bench/gpu_check.sh $(OUT)

clean:
	rm -rf build *.egg-info fastp2phd/_C*.so demo_output
