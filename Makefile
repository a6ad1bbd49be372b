# make test: a fresh clone to a passing test suite (creates .venv, installs, runs pytest).
# make demo: the whole pipeline on the CPU with the tiny model, then the served API checked.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 8000

.PHONY: test demo demo-clean clean-venv system-deps

# Debian packages some tests start for real: nginx in front of gunicorn, a Redis server for shared rate
# limits, headless Chromium (with a CJK font) to render the dashboard and the evaluation report. Installed
# when missing and this runs as root (CI, a container); otherwise it says what is missing and those tests
# skip, saying why.
DEBS := nginx redis-server chromium fonts-wqy-microhei
system-deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "note: not installed: $$missing (sudo apt-get install $$missing); the tests that need them skip"; fi

# torch first and by its exact pin, so pip takes the CPU build from disk instead of a CUDA build.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(STAMP) system-deps
	$(PY) -m pytest

# ---- the demo: each step is a file, so a re-run rebuilds only what is missing or out of date
TINY := models/tiny-qwen3/manifest.json
DATA := data/processed/train.jsonl
RUN := models/tiny-qwen3-lora/train_info.json
EVAL := models/tiny-qwen3-lora/eval-test/metrics.json
MERGED := models/tiny-qwen3-lora-merged/manifest.json

$(TINY): | $(STAMP)
	$(PY) download_model.py --tiny
$(DATA): data/sample_news.csv $(TINY) config.yaml
	$(PY) prepare_data.py
$(RUN): $(DATA)
	$(PY) train_qwen.py --force
$(EVAL): $(RUN)
	$(PY) evaluate_model.py
$(MERGED): $(RUN)
	$(PY) merge_lora.py --force

demo: $(STAMP) $(EVAL) $(MERGED)
	@echo "evaluation report: models/tiny-qwen3-lora/eval-test/report.html"
	PORT=$(DEMO_PORT) PYTHON=$(PY) bash demo_serve.sh

demo-clean:
	rm -rf models/tiny-qwen3 models/tiny-qwen3-lora models/tiny-qwen3-lora-merged data/processed

clean-venv:
	rm -rf $(VENV)
