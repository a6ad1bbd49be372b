#!/usr/bin/env bash
# The serving half of `make demo`: start_production.sh on the merged model, test_api.py against it,
# stop the server, print where everything is. Run it through `make demo`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-8000}
RUN_NAME=${RUN_NAME:-tiny-qwen3-lora}
CHECK_DATA=${CHECK_DATA:-data/sample_test.json}
CHECK_ITEMS=${CHECK_ITEMS:-0}  # 0: every item of CHECK_DATA
MIN_ACCURACY=${MIN_ACCURACY:-0.9}
URL="http://127.0.0.1:$PORT"
export PORT HOST=127.0.0.1 MODEL_PATH=models/$RUN_NAME-merged RUN_NAME
bash start_production.sh > logs/demo-server.txt 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -fs "$URL/health" > /dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat logs/demo-server.txt; echo "the server did not start" >&2; exit 1; }
  sleep 1
done
"$PY" test_api.py --url "$URL" --data "$CHECK_DATA" --max-items "$CHECK_ITEMS" --min-accuracy "$MIN_ACCURACY" | tee logs/demo-test-api.txt
"$PY" - <<'PY'
import json
import os
run = os.environ["RUN_NAME"]
m = json.load(open(f"models/{run}/eval-test/metrics.json"))
t = json.load(open(f"models/{run}/train_info.json"))
data = t["provenance"]["data"]["dir"]
api = open("logs/demo-test-api.txt").read().splitlines()
answers = next((line for line in api if " answers " in line), "")
print(f"""
demo summary
  base model       models/tiny-qwen3/ (random weights, real Qwen3 tokenizer)
  prepared data    {data}/ (train/val/test.jsonl, labels.json, report.json)
  adapter          models/{run}/ ({t['global_step']} steps, {t['train_seconds']:.0f}s, {t['tokens_per_second']:.0f} tokens/s, curves_*.png)
  evaluation       models/{run}/eval-test/ (test macro-F1 {m['macro_f1']:.3f}, accuracy {m['accuracy']:.3f}, report.html)
  merged model     models/{run}-merged/
  served answers   {answers.split('answers', 1)[-1].strip()}
  logs             logs/ (serve.jsonl, train_qwen.jsonl, demo-server.txt, demo-test-api.txt)""")
PY
