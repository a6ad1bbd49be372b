# make test: a fresh clone to a passing test suite (creates .venv, installs, runs pytest).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test clean-venv

# torch first and by its exact pin, so pip takes the CPU build from disk instead of a CUDA build.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
