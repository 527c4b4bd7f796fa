# make install   set up (idempotent; CPU build of torch on machines without a GPU, nothing on a GPU runner)
# make verify    the case matrix: cases/default.yaml on a GPU, cases/smoke.yaml under the CPU interpreter
# make test      the test suite
# make selfcheck known-bad kernels must fail, the correct one must pass with margin
# make memcheck  GPU: cases/smoke.yaml, each case under compute-sanitizer's memcheck (out-of-bounds accesses)
# make report    re-render every report format from reports/latest/results.json (with make bench's plot if there is one)
# make bench     kernel speed against the device's copy bandwidth and matmul rates (GPU)
PYTHON ?= python3
PYTEST_WORKERS ?= 2
# Python's bytecode is cached under .cache/pycache, out of the source tree and site-packages. The
# H200 machine's image sets PYTHONDONTWRITEBYTECODE=1 and holds no bytecode, so every command
# there compiled torch's, numpy's and pandas' modules from source (importing the harness: 5.3-5.9 s).
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX ?= $(CURDIR)/.cache/pycache

.PHONY: install verify test selfcheck memcheck report bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

verify:
	$(PYTHON) -m harness verify $(ARGS)

test:
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) tests

selfcheck:
	$(PYTHON) -m harness selfcheck $(ARGS)

memcheck:
	$(PYTHON) -m harness verify --memcheck --cases cases/smoke.yaml $(ARGS)

report:
	$(PYTHON) -m harness report reports/latest/results.json $(if $(wildcard results/bench.png),--bench-plot results/bench.png)

bench:
	$(PYTHON) -m bench.run $(ARGS)
