# The two commands a newcomer needs:  make demo  (set up + segment the built-in case into out/)
#                                     make test  (set up + run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.brainunet-installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build available offline; a newer torch also works.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,train]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/brainunet demo --output-dir out

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q Testing

clean:
	rm -rf $(VENV) out .pytest_cache
