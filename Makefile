# The two commands a newcomer needs:  make demo  (set up + segment the built-in case into out/)
#                                     make test  (set up + run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.brainunet-installed

.PHONY: setup demo test test-bench bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the version tested (a newer one also works). PyPI's Linux wheel is the CUDA build
	# (several GB); for the CPU build, run with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	# The installed torch is a constraint: nnunetv2 (benchmarks) would otherwise pull the newest CUDA build.
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -e ".[test,train,bench]" -c $(VENV)/constraints.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/brainunet demo --output-dir out

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m "not bench" Testing

# The benchmark scripts, each once on a tiny case (no timing is asserted): they must not rot
test-bench: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m bench Testing

# Benchmarks (not part of the tests; ~45 min on 2 cores with the real case in ../shared): BENCHMARKS.md
bench: $(STAMP)
	$(PY) benchmarks/pipeline.py --repeats 5
	$(PY) benchmarks/peers.py
	$(PY) benchmarks/variants.py
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/robustness.py
	$(PY) benchmarks/where_time_goes.py
	$(PY) benchmarks/error_analysis.py
	$(PY) benchmarks/training_step.py --repeats 3 --steps 3
	$(PY) benchmarks/gui_thread.py
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) out .pytest_cache
