# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when needed and install the
# CPU build of torch first, so pip never pulls a multi-GB CUDA build on a machine without a GPU.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0

.PHONY: demo test install install-dev clean

demo: $(VENV)/.installed
	$(VENV)/bin/evomerge demo

test: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -q

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq "$(TORCH)"
	$(PIP) install -qq -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -qq -e ".[dev,lmeval]"
	touch $@

clean:
	rm -rf $(VENV) .evomerge build *.egg-info
