# Single entry point. `make demo` and `make test` create/reuse the project-local .venv.
# torch/torchvision are installed first, at the tested releases, so that nnunetv2's own torch requirement is
# already met and pip never fetches a second build. Which build comes from your pip index: on Linux the PyPI
# wheel is a CUDA build (it runs on a CPU too); for a CPU-only build (smaller download) or a specific CUDA
# version pass PyTorch's index, e.g.  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: demo test bench install clean-venv

install: $(STAMP)

# .[test] includes the valdo extra (ranger21), so every trainer's tests run
$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q $(TORCH_PINS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nnunetv2_ohem_demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)
