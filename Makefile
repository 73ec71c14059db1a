# The two commands: `make test` and `make bench`. Both work on a fresh machine with only Python:
# they create $(VENV) if missing and install what they need into it.
#
#   TORCH_SPEC   torch to install; default: torch==2.13.0, and only when no torch is importable in
#                the venv. GPU users keep their own torch with VENV_ARGS=--system-site-packages
#                (the system torch is then importable and nothing is installed), or name one.
#   TRITON_SPEC  default triton==3.6.0 (the supported floor and our GPU machines' version);
#                TRITON_SPEC= (empty) keeps whatever triton is installed.
#   NUMPY_SPEC   numpy<2.4: numpy 2.4 breaks Triton 3.6's CPU interpreter (scalar conversion).

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
PY := $(VENV)/bin/python
TORCH_SPEC ?=
DEFAULT_TORCH_SPEC := torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
NUMPY_SPEC ?= numpy<2.4
PIP := $(PY) -m pip install --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: install test bench compile-check clean

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) "$(TORCH_SPEC)"; \
	elif ! $(PY) -c "import torch" 2>/dev/null; then $(PIP) "$(DEFAULT_TORCH_SPEC)"; fi
	if [ -n "$(TRITON_SPEC)" ]; then $(PIP) "$(TRITON_SPEC)" "$(NUMPY_SPEC)"; fi
	$(PIP) -e ".[dev]" "$(NUMPY_SPEC)"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests -q -ra -p no:cacheprovider $(PYTEST_ARGS)
	env -u TRITON_INTERPRET $(PY) -m benchmarks.compile_check

compile-check: $(VENV)/.installed
	env -u TRITON_INTERPRET $(PY) -m benchmarks.compile_check

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
