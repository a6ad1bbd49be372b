"""Measure the toolkit's real code paths on a model of a published shape, with random weights, under a GPU
memory cap: the 8B's memory and speed depend on its architecture, not on its trained values.

    python measure_shape.py --shape qwen3-8b --gpu-memory-gib 10             # on a GPU box: every part
    python measure_shape.py --shape qwen3-8b --gpu-memory-gib 10 --only serve # one part (each fits 10 minutes)
    python measure_shape.py --shape tiny --prompt-tokens 64 --new-tokens 8 --train-steps 2   # the CPU check

Builds the shape once (Qwen3 config, random weights, the tiny model's real tokenizer and chat template)
in models/shape-<name>/ and reuses it; then, each through the toolkit's own scripts, with
QWEN_PROFILE=none (the 8B's settings) and model.gpu_memory_cap_gib = --gpu-memory-gib:
  serve  start_production.sh in 8-bit, then 4-bit: time to first token of a --prompt-tokens prompt,
         decode tokens/s with 1 and 3 requests (prompt + --new-tokens each), a burst of 13, label scoring
         items/s, peak GPU memory from /stats
  train  train_qwen.py, QLoRA with the config's r, batch and length, for --train-steps steps on examples
         of data.max_tokens tokens: peak memory, tokens/s
  merge  --run-merge: merge_lora.py on the adapter the train part wrote (else a synthetic r=64 adapter on
         all seven projections): peak RSS, time, and merged tensors checked against W + scale·B·A
Writes measure-<shape>.json and .md to --output-dir, each figure beside verify_setup's estimate.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from common.bench import free_port, machine, timed_pool
from common.cli import run_stage
from common.config import ROOT, UserError

SHAPES = {"qwen3-8b": "Qwen3-8B", "qwen3-4b": "Qwen3-4B", "qwen3-14b": "Qwen3-14B"}
LABELS = ["正面", "负面"]


# ----------------------------------------------------------------------------- the model of that shape
def shape_config(name: str, cfg) -> dict:
    from common.model.memory import QWEN3_SHAPES
    if name == "tiny":
        t = cfg.tiny
        return dict(QWEN3_SHAPES["Qwen3-8B"], hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim)
    if name not in SHAPES:
        raise UserError(f"--shape must be tiny or one of {', '.join(SHAPES)}, got '{name}'")
    return dict(QWEN3_SHAPES[SHAPES[name]])


def build_shape(name: str, cfg, target: Path) -> Path:
    """`target` (models/shape-<name>/): random bf16 weights (std 0.02, norms 1) and the tiny model's
    tokenizer; built once, then reused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    from common.model.files import MANIFEST, save_atomically, write_manifest
    from common.model.tiny_qwen import build_qwen_tokenizer
    if (target / MANIFEST).is_file():
        return target
    config = AutoConfig.for_model(**{**shape_config(name, cfg), "bos_token_id": 151643, "eos_token_id": 151645,
                                     "pad_token_id": 151643})
    print(f"building {target}: {config.num_hidden_layers} layers x {config.hidden_size}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU draws 8B numbers in a blink
    with no_init_weights(), torch.device(device):  # the normal init of 8B parameters takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator) if p.dim() > 1 else p.fill_(1.0)

    def write(tmp: Path) -> None:
        model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False)
        model.save_pretrained(tmp, max_shard_size="2GB")
        build_qwen_tokenizer().save_pretrained(tmp)
        write_manifest(tmp, source="measure_shape", shape=name, weights="random normal(0, 0.02), seed 0")
    save_atomically(target, write, force=True)
    return target


# ----------------------------------------------------------------------------- serving
def prompt_of(tokenizer, tokens: int) -> list[dict]:
    """A user message whose chat prompt is at most `tokens` tokens, as close as whole characters get."""
    from common.text.prompts import prompt_ids
    def length(text: str) -> int:
        return len(prompt_ids(tokenizer, [{"role": "user", "content": text}]))
    text = ""
    for unit in ("市场今日小幅波动，成交量温和。", "。"):
        while length(text + unit) <= tokens:
            text += unit
    return [{"role": "user", "content": text}]


def serve(model_dir: Path, logs: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """start_production.sh on a free port; waits for /health (loading an 8B takes minutes)."""
    port = free_port()
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}, "PORT": str(port),
            "HOST": "127.0.0.1", "MODEL_PATH": str(model_dir), "LOGS_DIR": str(logs), "PYTHON": sys.executable,
            "QWEN_SERVE_RATE_LIMITS": "100000/minute", "QWEN_SERVE_GLOBAL_RATE_LIMIT": "100000/minute", **env}
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "server.txt", "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(["bash", str(ROOT / "start_production.sh")], cwd=ROOT, env=full, stdout=out,
                                stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited: see {logs / 'server.txt'}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise UserError(f"the server did not load within 15 minutes: see {logs / 'server.txt'}")


def streamed(url: str, messages: list[dict], new_tokens: int) -> tuple[float | None, float | None, str | None]:
    """(time to first token, decode tokens/s after it, None) of one streamed request, or (None, None, the
    error code) when the server refused or ended it (a 4xx/5xx, or an error event in the stream)."""
    body = {"messages": messages, "max_tokens": new_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    t0, first, error = time.perf_counter(), None, None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=1800) as r:
        if r.status_code != 200:
            return None, None, f"http_{r.status_code}"
        for line in r.iter_lines(decode_unicode=True):
            if first is None and line.startswith("data: ") and '"content"' in line and '"role"' not in line:
                first = time.perf_counter()
            if line.startswith("data: {") and '"error"' in line:
                error = json.loads(line[6:])["error"].get("code") or "error"
    if error or first is None:
        return None, None, error or "no_content"
    return first - t0, (new_tokens - 1) / max(time.perf_counter() - first, 1e-9), None


def serving_figures(url: str, messages: list[dict], args) -> dict:
    """TTFT and decode rate alone and three at once, a burst of 13, label scoring: the server's own figures.
    A request the server refuses (its KV budget holds fewer than three such requests) is counted, not fatal."""
    ttft, alone, error = streamed(url, messages, args.new_tokens)
    if error:
        raise UserError(f"a single {args.prompt_tokens}-token prompt + {args.new_tokens} tokens failed: {error}")
    three, wall = timed_pool(lambda _: streamed(url, messages, args.new_tokens), range(3), 3)
    done3 = [t for t in three if t[2] is None]
    burst = {"messages": messages, "max_tokens": args.burst_new_tokens, "ignore_eos": True}
    codes, burst_s = timed_pool(lambda _: requests.post(url + "/v1/chat/completions", json=burst,
                                                        timeout=1800).status_code, range(13), 13)
    texts = [messages[0]["content"][:24]] * 32  # short: scoring is about the prompt pass, not its length
    _, score_s = timed_pool(lambda _: requests.post(url + "/v1/classify", json={"text": texts, "labels": LABELS},
                                                    timeout=600).raise_for_status(), range(2), 1)
    stats = requests.get(url + "/stats", timeout=30).json()
    return {"ttft_s": round(ttft, 3), "decode_tokens_per_s_1": round(alone, 1),
            "decode_tokens_per_s_3": round(len(done3) * args.new_tokens / wall, 1),
            "ttft_s_3": round(max(t[0] for t in done3), 3) if done3 else None,
            "refused_of_3": [t[2] for t in three if t[2]],
            "burst_13": {str(c): codes.count(c) for c in sorted(set(codes))}, "burst_seconds": round(burst_s, 1),
            "classify_items_per_s": round(64 / score_s, 1), "memory": stats.get("memory"),
            "engine": {k: stats.get("engine", {}).get(k) for k in ("kv_budget_tokens", "peak_kv_tokens_reserved",
                                                                    "peak_running", "effective_concurrency")}}


def serve_part(model_dir: Path, args, out: Path, result: dict) -> dict:
    """Each --quant in turn (8-bit, then 4-bit); each one's figures are saved as soon as they exist."""
    from common.model.loading import load_tokenizer
    messages = prompt_of(load_tokenizer(model_dir), args.prompt_tokens)
    results = result.setdefault("serve", {})
    for quant in args.quant or ("8bit", "4bit"):
        t0 = time.time()
        proc, url = serve(model_dir, out / f"serve-{quant}", {**args.env, "QUANTIZATION": quant})
        try:
            results[quant] = {"load_seconds": round(time.time() - t0, 1)} | serving_figures(url, messages, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        args.save(result)
    return results


# ----------------------------------------------------------------------------- training and merging
def synthetic_data(tokenizer, out: Path, tokens: int, n: int = 64) -> Path:
    """Prepared classification data whose examples are about `tokens` long (the batch length to measure)."""
    processed = out / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    text = prompt_of(tokenizer, max(tokens - 80, 8))[0]["content"]  # leave room for the system prompt and label
    rows = [json.dumps({"text": f"{i}{text}", "label": LABELS[i % 2]}, ensure_ascii=False) for i in range(n)]
    for split in ("train", "val", "test"):
        (processed / f"{split}.jsonl").write_text("\n".join(rows[:n if split == "train" else 8]) + "\n")
    (processed / "labels.json").write_text(json.dumps({"task": "classification", "labels": LABELS}))
    return processed


def train_part(model_dir: Path, args, out: Path) -> dict:
    from common.config import load_config
    from common.model.loading import load_tokenizer
    cfg = load_config(profile="none", use_env=False)
    processed = synthetic_data(load_tokenizer(model_dir), out, cfg.data.max_tokens)
    cmd = [sys.executable, str(ROOT / "train_qwen.py"), "--model", str(model_dir), "--set",
           f"data.processed_dir={processed}", "--runs-dir", str(out / "runs"), "--run-name", "qlora", "--force",
           "--max-steps", str(args.train_steps), "--eval-steps", "100000", "--save-steps", "100000",
           "--report-to", "[]", "--eval-max-items", "4"]
    import torch
    if not torch.cuda.is_available():  # the config's paged 8-bit Adam needs CUDA; this is the CPU check
        cmd += ["--optimizer", "adamw_torch_fused"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QWEN_")}, **args.env}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "train.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "log": str(out / "train.txt")}
    info = json.loads((out / "runs" / "qlora" / "train_info.json").read_text())
    return {k: info[k] for k in ("method", "peak_memory_gib", "tokens_per_second", "train_seconds", "device")} | \
        {"batch": cfg.train.batch_size, "tokens_per_example": cfg.data.max_tokens, "steps": info["global_step"]}


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synthetic_adapter(model_dir: Path, out: Path, r: int = 64, alpha: int = 128) -> Path:
    """An r=64, alpha=128 (scale 2) adapter on all seven projections, as peft saves one, with random A and
    B (peft starts B at zero: a trained adapter's update is not), for a shape no run has trained on."""
    import torch
    from safetensors.torch import save_file

    from common.model.lora_merge import PREFIX, read_header, weight_map
    adapter, gen = out / "synthetic-lora", torch.Generator().manual_seed(1)
    files = weight_map(model_dir)
    tensors = {}
    for name in (n for n in files if n.removesuffix(".weight").endswith(PROJECTIONS)):
        rows, cols = read_header(model_dir / files[name])[name]["shape"]
        module = PREFIX + name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = (torch.randn(r, cols, generator=gen) * 0.02).bfloat16()
        tensors[module + ".lora_B.weight"] = (torch.randn(rows, r, generator=gen) * 0.02).bfloat16()
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": list(PROJECTIONS), "base_model_name_or_path": str(model_dir), "bias": "none"}
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (adapter / "labels.json").write_text(json.dumps({"task": "classification", "labels": LABELS}))
    return adapter


def check_merged(model_dir: Path, adapter: Path, merged: Path) -> dict:
    """Targets equal W + scale·B·A computed here in fp32 and rounded once; a few untouched tensors equal
    the base's bytes."""
    import torch

    from common.model.lora_merge import PREFIX, lora_scale, read_tensor, weight_map
    base, files, config = weight_map(model_dir), weight_map(merged), json.loads((adapter / "adapter_config.json")
                                                                               .read_text())
    last, found = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] - 1, {}
    for module in ("model.layers.0.self_attn.q_proj", f"model.layers.{last // 2}.mlp.down_proj",
                   f"model.layers.{last}.self_attn.v_proj"):
        w = read_tensor(model_dir / base[module + ".weight"], module + ".weight")
        a, b = (read_tensor(adapter / "adapter_model.safetensors", f"{PREFIX}{module}.lora_{x}.weight") for x in "AB")
        want = (w.float() + (b.float() @ a.float()) * lora_scale(config, module)).to(w.dtype)
        got = read_tensor(merged / files[module + ".weight"], module + ".weight")
        gap = (got.float() - want.float()).abs().max()
        found[module] = "equal" if torch.equal(got, want) else f"max diff {gap:.3g}"
    for name in ("model.embed_tokens.weight", f"model.layers.{last}.input_layernorm.weight", "model.norm.weight"):
        same = torch.equal(read_tensor(merged / files[name], name).view(torch.uint8).flatten(),
                           read_tensor(model_dir / base[name], name).view(torch.uint8).flatten())
        found[name] = "same bytes" if same else "DIFFERENT bytes"
    return found


def merge_part(model_dir: Path, args, out: Path) -> dict:
    """With --run-merge: merge_lora.py on the adapter the train part wrote (else a synthetic r=64 one), its
    peak RSS (the child's ru_maxrss) and time, then its tensors checked; the merged copy is removed after."""
    import resource
    import shutil

    from common.model.loading import load_tokenizer, pick_device
    found = {"device": pick_device(), "weights_gb": round(sum(f.stat().st_size for f in model_dir.glob(
        "*.safetensors")) / 1e9, 2)}
    if not args.run_merge:
        return found
    adapter = out / "runs" / "qlora"
    if not (adapter / "train_info.json").is_file():
        adapter = synthetic_adapter(model_dir, out)
    processed = synthetic_data(load_tokenizer(model_dir), out / "merge", 128)  # 8 prompts of ~128 tokens
    t0, merged = time.time(), out / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "merge_lora.py"), "--adapter", str(adapter), "--output",
                           str(merged), "--force", "--set", f"data.processed_dir={processed}"], cwd=ROOT, env={**os.environ, **args.env},
                          capture_output=True, text=True)
    (out / "merge.txt").write_text(proc.stdout + proc.stderr)
    found |= {"adapter": adapter.name, "merged": proc.returncode == 0, "seconds": round(time.time() - t0, 1),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
              "output": [ln for ln in proc.stdout.splitlines() if ln.startswith(("parity", "merged"))] or
              proc.stderr.strip().splitlines()[-1:]}
    if proc.returncode == 0:
        found["tensors"] = check_merged(model_dir, adapter, merged)
        shutil.rmtree(merged)  # 16 GB of random weights: the figures are what this part is for
    return found


# ----------------------------------------------------------------------------- estimates and the report
def estimates(name: str, cfg, card_gib: float | None) -> dict:
    """verify_setup's figures for this shape, so each measurement stands beside its estimate."""
    from common.config import load_config
    from common.model.memory import Placement, choose_placement, serving_fit, training_fit
    plain = load_config(profile="none", use_env=False)
    shape = shape_config(name, cfg)
    out = {}
    for quant in ("8bit", "4bit"):
        placement = choose_placement(shape, quant, plain.serve, card_gib) if card_gib else Placement(quant)
        fit = serving_fit(shape, placement, plain.serve)
        out[f"serve_{quant}"] = {"weights_gib": round(fit.weights_gpu, 2), "total_gib": round(fit.total, 2),
                                 "placement": placement.__dict__}
    train = training_fit(shape, "4bit", plain.train, plain.data.max_tokens, 4)
    out["train_qlora_gib"] = round(train.total, 2)
    return out


def markdown(result: dict) -> str:
    rows = [f"# {result['shape']} with random weights, GPU memory cap {result['gpu_memory_gib']} GiB",
            "", f"{result['machine']}; {result['date']}", "", "| part | figure | measured | estimate |",
            "| --- | --- | --- | --- |"]
    est = result.get("estimates", {})
    for quant, s in result.get("serve", {}).items():
        mem = s.get("memory") or {}
        peak = mem.get("peak_total_gib", mem.get("rss_gib"))
        rows += [f"| serve {quant} | peak memory (GiB): allocator peak + CUDA context | {peak} | "
                 f"{est.get(f'serve_{quant}', {}).get('total_gib')} |",
                 f"| serve {quant} | allocated at the end: weights + held caches (GiB) | {mem.get('allocated_gib', '')} | "
                 f"{est.get(f'serve_{quant}', {}).get('weights_gib')} |",
                 f"| serve {quant} | load time | {s.get('load_seconds')} s | |",
                 f"| serve {quant} | time to first token | {s['ttft_s']} s | |",
                 f"| serve {quant} | decode tokens/s, 1 / 3 requests | {s['decode_tokens_per_s_1']} / "
                 f"{s['decode_tokens_per_s_3']}" + (f" (refused: {', '.join(s['refused_of_3'])})"
                                                     if s.get("refused_of_3") else "") + " | |",
                 f"| serve {quant} | KV budget, tokens (3 requests need {3 * (result.get('prompt_tokens') or 0) + 3 * (result.get('new_tokens') or 0)}) | "
                 f"{(s.get('engine') or {}).get('kv_budget_tokens')} | |",
                 f"| serve {quant} | burst of 13 | {s['burst_13']} in {s['burst_seconds']} s | |",
                 f"| serve {quant} | label scoring | {s['classify_items_per_s']} items/s | |"]
    if "train" in result:
        t = result["train"]
        rows.append(f"| train qlora | peak memory (GiB), tokens/s | {t.get('peak_memory_gib')}, "
                    f"{t.get('tokens_per_second')} | {est.get('train_qlora_gib')} |")
    if "merge" in result:
        m = result["merge"]
        rows.append(f"| merge | where it runs; peak RSS, wall time | {m['device']}; {m.get('peak_rss_gib', '-')} "
                    f"GiB, {m.get('seconds', '-')} s | |")
    return "\n".join(rows) + "\n"


def run(cfg, args) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.env = {"QWEN_PROFILE": "none", "QWEN_SERVE_MAX_PROMPT_TOKENS": str(max(args.prompt_tokens, 512)),
                **({"QWEN_MODEL_GPU_MEMORY_CAP_GIB": str(args.gpu_memory_gib)} if args.gpu_memory_gib else {})}
    model_dir = build_shape(args.shape, cfg, Path(args.shape_dir) if args.shape_dir else
                            cfg.resolve(f"models/shape-{args.shape}"))
    path = out / f"measure-{args.shape}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result |= {"shape": args.shape, "gpu_memory_gib": args.gpu_memory_gib, "machine": machine(),
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "date": time.strftime("%Y-%m-%d"), "estimates": estimates(args.shape, cfg, args.gpu_memory_gib)}
    parts = {"serve": serve_part, "train": train_part, "merge": merge_part}

    def save(result: dict) -> None:  # a part that finished is kept, whatever happens to the next
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        (out / f"measure-{args.shape}.md").write_text(markdown(result), encoding="utf-8")
    args.save = save
    for part in args.only or list(parts):
        print(f"measuring {part} ...", flush=True)
        if part == "serve":
            serve_part(model_dir, args, out, result)
        else:
            result[part] = parts[part](model_dir, args, out)
        save(result)
    return result


def add_args(parser) -> None:
    parser.add_argument("--shape", default="qwen3-8b", help="qwen3-8b (default), qwen3-4b, qwen3-14b or tiny")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="the card to emulate (10: an RTX 3080)")
    parser.add_argument("--only", action="append", choices=["serve", "train", "merge"], help="these parts only")
    parser.add_argument("--quant", action="append", choices=["8bit", "4bit"], help="serve part: these only")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="the serving test's prompt (serve.max_prompt_tokens)")
    parser.add_argument("--new-tokens", type=int, default=512, help="generated per request (serve.max_tokens)")
    parser.add_argument("--burst-new-tokens", type=int, default=64, help="generated per request in the burst of 13")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--run-merge", action="store_true", help="merge part: run merge_lora.py (16 GB of disk on the 8B)")
    parser.add_argument("--output-dir", default=str(ROOT / "logs" / "measure"))
    parser.add_argument("--shape-dir", help="where the random-weight model is built and cached (models/shape-<shape>)")


def report(result: dict) -> None:
    print(markdown(result))


def main(argv=None) -> int:
    return run_stage("measure_shape", __doc__, run, add_args=add_args, report=report, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
