# One-command entry points. `make demo` and `make test` set everything up themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SPECTRA := $(VENV)/bin/spectra

.PHONY: setup demo test test-fast figures tiny-model benchmarks clean

setup: $(VENV)/.installed

# torch is pinned to 2.13.0 so pip takes the CPU wheel on disk, never a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The main job: a short REVIVE on/off MEMIT drift run on the embedded tiny model, with its figures.
demo: setup
	$(SPECTRA) drift --model tiny --editor memit --rounds 4 --batch-size 10 --revive both --tau 0.1 \
		--eval-records 40 --items-per-task 50 --represent-prompts 50

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Regenerate the reference figures of the embedded model shown in the README.
figures: setup
	$(PY) -m spectra.experiments.reference_figures figures
	$(PY) -m spectra.experiments.open_questions figures

tiny-model: setup
	$(SPECTRA) train-tiny

benchmarks: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
