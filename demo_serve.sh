#!/usr/bin/env bash
# The serving half of `make demo`: start_production.sh on the merged model, test_api.py against it,
# stop the server, print where everything is. Run it through `make demo`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-8000}
URL="http://127.0.0.1:$PORT"
export PORT HOST=127.0.0.1 MODEL_PATH=models/tiny-qwen3-lora-merged
bash start_production.sh > logs/demo-server.txt 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -fs "$URL/health" > /dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat logs/demo-server.txt; echo "the server did not start" >&2; exit 1; }
  sleep 1
done
"$PY" test_api.py --url "$URL" --min-accuracy 0.9 | tee logs/demo-test-api.txt
"$PY" - <<'PY'
import json
m = json.load(open("models/tiny-qwen3-lora/eval-test/metrics.json"))
t = json.load(open("models/tiny-qwen3-lora/train_info.json"))
api = open("logs/demo-test-api.txt").read().splitlines()
answers = next((line for line in api if " answers " in line), "")
print(f"""
demo summary
  base model       models/tiny-qwen3/ (random weights, real Qwen3 tokenizer)
  prepared data    data/processed/ (train/val/test.jsonl, labels.json, report.json)
  adapter          models/tiny-qwen3-lora/ ({t['global_step']} steps, {t['train_seconds']:.0f}s, {t['tokens_per_second']:.0f} tokens/s)
  evaluation       models/tiny-qwen3-lora/eval-test/ (test macro-F1 {m['macro_f1']:.3f}, accuracy {m['accuracy']:.3f}, report.html)
  merged model     models/tiny-qwen3-lora-merged/
  served answers   {answers.split('answers', 1)[-1].strip()}
  logs             logs/ (serve.jsonl, train_qwen.jsonl, demo-server.txt, demo-test-api.txt)""")
PY
