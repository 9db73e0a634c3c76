# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Installed once per change of the packaging files.  Compat editable mode
# keeps twisted/plugins visible to twistd while the code stays editable.
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		--config-settings editable_mode=compat -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/meter demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var build *.egg-info twisted/plugins/dropin.cache
