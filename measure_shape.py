"""Measure the toolkit's real code paths on a model of a published shape, with random weights, under a GPU
memory cap: the 8B's memory and speed depend on its architecture, not on its trained values.

    python measure_shape.py --shape qwen3-8b --gpu-memory-gib 10 --deadline-s 450   # a lent GPU: one call
    python measure_shape.py --shape qwen3-8b --gpu-memory-gib 10 --only train       # one part
    python measure_shape.py --shape qwen3-8b --quant 4bit --only serve              # one variant
    python measure_shape.py --shape tiny --prompt-tokens 64 --new-tokens 8 --decode-tokens 8 --train-steps 2

Builds the shape once (Qwen3 config, random weights, the tiny model's real tokenizer and chat template;
in a child process, so no CUDA context of this one sits on the card it measures) in models/shape-<name>/
and reuses it; then, each through the toolkit's own scripts, with QWEN_PROFILE=none (the 8B's settings)
and model.gpu_memory_cap_gib = --gpu-memory-gib:
  serve  start_production.sh for each --quant (8bit@6: LLM.int8 at outlier threshold 6.0, 8bit@0 at 0.0,
         4bit: NF4): load time, weights and KV budget (/stats), whether 3 x (--prompt-tokens +
         --new-tokens) are admitted at once (all reach their first token before any ends; then they are
         cancelled), time to first token, decode tokens/s per request alone and 3 at once over
         --decode-tokens, /v1/classify items/s for 8 labels and ~300-token prompts (1 and 32 a call)
         against generating the label (benchmark.py), peak allocated memory and the CUDA context; then,
         the server stopped, benchmark.py --bare: model.generate loaded the same way, the engine's yardstick
  train  train_qwen.py, QLoRA at the config's r, micro-batch and length, --train-steps steps on examples
         of data.max_tokens tokens: peak memory (+ CUDA context), tokens/s
  merge  --run-merge: merge_lora.py on the adapter the train part wrote (else a synthetic r=64 adapter on
         all seven projections): peak RSS, time, and merged tensors checked against W + scale·B·A
Writes measure-<shape>.json and .md to --output-dir after every step (a killed run keeps what it
measured), each figure beside verify_setup's estimate; --deadline-s starts no step it cannot finish.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from common.bench import admission, machine, run_benchmark, start_server, stop_server, streams_at_once, wait_idle
from common.cli import run_stage
from common.config import ROOT, UserError

SHAPES = {"qwen3-8b": "Qwen3-8B", "qwen3-4b": "Qwen3-4B", "qwen3-14b": "Qwen3-14B"}
LABELS = ["正面", "负面"]
TOPICS = ["体育", "财经", "科技", "娱乐", "教育", "健康", "军事", "汽车"]  # the classify test's 8 labels
VARIANTS = ("8bit@6", "8bit@0", "4bit")  # LLM.int8 at outlier threshold 6.0 (bitsandbytes' default), 0.0; NF4


# ----------------------------------------------------------------------------- the model of that shape
def shape_config(name: str, cfg) -> dict:
    from common.model.memory import QWEN3_SHAPES
    from common.model.tiny_qwen import tiny_shape
    if name == "tiny":
        return tiny_shape(cfg.tiny)
    if name not in SHAPES:
        raise UserError(f"--shape must be tiny or one of {', '.join(SHAPES)}, got '{name}'")
    return dict(QWEN3_SHAPES[SHAPES[name]])


def build_shape(name: str, cfg, target: Path) -> Path:
    """`target` (models/shape-<name>/), built once in a child process, then reused."""
    import multiprocessing

    from common.model.files import MANIFEST
    from common.model.tiny_qwen import write_shape_model
    if not (target / MANIFEST).is_file():
        child = multiprocessing.get_context("spawn").Process(target=write_shape_model, args=(
            shape_config(name, cfg), name, target))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise UserError(f"building the {name} shape in {target} failed (exit {child.exitcode})")
    return target


# ----------------------------------------------------------------------------- serving
def variant_env(variant: str) -> dict[str, str]:
    """8bit@6 -> QUANTIZATION=8bit, model.int8_threshold 6; 4bit -> QUANTIZATION=4bit."""
    quant, _, threshold = variant.partition("@")
    try:
        if quant not in ("8bit", "4bit") or (threshold and (quant != "8bit" or float(threshold) < 0)):
            raise ValueError
    except ValueError:
        raise UserError(f"--quant takes 8bit, 8bit@<outlier threshold> or 4bit, got '{variant}'") from None
    return {"QUANTIZATION": quant} | ({"QWEN_MODEL_INT8_THRESHOLD": threshold} if threshold else {})


def classify_items(tokenizer, out: Path, n: int = 32, tokens: int = 300) -> Path:
    """n texts whose classification prompt (8 labels, the prompt contract) is about `tokens` tokens."""
    from common.config import load_config
    from common.text.prompts import build_messages, filler_text
    pcfg = load_config(profile="none", use_env=False).prompt
    text = filler_text(tokenizer, tokens - 4, lambda t: build_messages(t, TOPICS, pcfg))
    path = out / "classify-items.json"
    path.write_text(json.dumps([{"text": f"{i}{text}", "label": TOPICS[i % 8]} for i in range(n)], ensure_ascii=False))
    return path


def serve_variant(model_dir: Path, variant: str, messages: list[dict], args, out: Path, found: dict) -> None:
    """One variant's figures, each saved into `found` (and to disk) as soon as it exists."""
    from common.model.loading import load_tokenizer
    from common.text.prompts import encode_text
    env, logs = {**args.env, **variant_env(variant)}, out / f"serve-{variant}"
    t0 = time.time()
    proc, url = start_server(model_dir, logs, env)
    try:
        stats = requests.get(url + "/stats", timeout=30).json()
        found |= {"load_seconds": round(time.time() - t0, 1), "placement": stats.get("placement"),
                  "loaded_gib": (stats.get("memory") or {}).get("allocated_gib"),
                  "kv_budget_tokens": (stats.get("engine") or {}).get("kv_budget_tokens")}
        args.save()
        found["admission"] = admission(url, messages, args.new_tokens)
        found["idle_after_cancel"] = wait_idle(url)
        args.save()
        one = streams_at_once(url, messages, args.decode_tokens, 1)[0]
        three = streams_at_once(url, messages, args.decode_tokens, 3)
        rates = [s.decode_rate() for s in three if s.decode_rate()]
        found |= {"ttft_s": one.ttft(), "decode_tokens_per_s_1": round(one.decode_rate() or 0, 1),
                  "decode_tokens_per_s_3": round(sum(rates) / len(rates), 1) if rates else None,
                  "errors_of_3": [s.error for s in three if s.error]}
        args.save()
        tok = load_tokenizer(model_dir)  # a generated label: its tokens and the end of the turn
        label_tokens = 1 + max(len(encode_text(tok, t)) for t in TOPICS)
        found["classify"] = run_benchmark(["--url", url, "--mode", "classify", "--data", str(classify_items(tok, logs)),
                                           "--labels", ",".join(TOPICS), "--concurrency", "1", "--generate-tokens",
                                           str(label_tokens)], env, logs, "classify")
        stats = requests.get(url + "/stats", timeout=30).json()
        found |= {"memory": stats.get("memory"), "engine": {k: (stats.get("engine") or {}).get(k) for k in (
            "peak_kv_tokens_reserved", "peak_running", "effective_concurrency")}}
    finally:
        stop_server(proc)
    args.save()
    if args.left() < 60:
        found["bare"] = {"skipped": "the deadline"}
        return
    bare = run_benchmark(["--bare", str(model_dir), "--prompt-tokens", str(args.prompt_tokens), "--max-tokens",
                          str(args.decode_tokens), "--requests", "1"], env, logs, "bare")
    found["bare"] = bare.get("bare", bare)


def serve_part(model_dir: Path, args, out: Path, result: dict) -> dict:
    """Each --quant in turn; a variant that cannot finish before --deadline-s is not started."""
    from common.model.loading import load_tokenizer
    from common.text.prompts import filler_text
    messages = [{"role": "user", "content": filler_text(load_tokenizer(model_dir), args.prompt_tokens)}]
    results = result.setdefault("serve", {})
    for variant in args.quant or VARIANTS:
        variant_env(variant)
        if args.left() < 120:
            results[variant] = {"skipped": "the deadline"}
            continue
        results[variant] = {}
        serve_variant(model_dir, variant, messages, args, out, results[variant])
    return results


# ----------------------------------------------------------------------------- training and merging
def synthetic_data(tokenizer, out: Path, tokens: int, n: int = 64) -> Path:
    """Prepared classification data whose examples are about `tokens` long (the batch length to measure)."""
    processed = out / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    from common.text.prompts import filler_text
    text = filler_text(tokenizer, max(tokens - 80, 8))  # leave room for the system prompt and label
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
    return {k: info.get(k) for k in ("method", "peak_memory_gib", "peak_reserved_gib", "cuda_context_gib",
                                     "tokens_per_second", "train_seconds", "device")} | \
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


def dig(d: dict, *keys, default="-"):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return default if d is None else d


def markdown(result: dict) -> str:
    p, n = result.get("prompt_tokens") or 0, result.get("new_tokens") or 0
    rows = [f"# {result['shape']} with random weights, GPU memory cap {result['gpu_memory_gib']} GiB", "",
            f"{result['machine']}; {result['date']}", "", "| part | figure | measured | estimate |", "| --- | --- | --- | --- |"]
    est = result.get("estimates", {})
    for v, s in result.get("serve", {}).items():
        e, mem, cls, bare = est.get(f"serve_{v.partition('@')[0]}", {}), s.get("memory") or {}, s.get("classify") or {}, s.get("bare") or {}
        if "skipped" in s:
            rows.append(f"| serve {v} | not measured: {s['skipped']} | | |")
            continue
        adm, ratio = s.get("admission") or {}, (s.get("decode_tokens_per_s_1") or 0) / (bare.get("decode_tokens_per_s") or float("inf"))
        rows += [f"| serve {v} | load time; allocated after loading (weights) | {s.get('load_seconds')} s; {s.get('loaded_gib')} GiB | {e.get('weights_gib')} GiB |",
                 f"| serve {v} | KV budget (tokens); 3 x ({p} + {n}) admitted at once | {s.get('kv_budget_tokens')}; "
                 f"{dig(adm, 'admitted_at_once')} of 3 (first tokens at {dig(adm, 'ttft_s')} s) | {3 * (p + n)} needed |",
                 f"| serve {v} | time to first token, {p}-token prompt | {s.get('ttft_s', '-')} s | |",
                 f"| serve {v} | decode tokens/s per request, alone / 3 at once | {s.get('decode_tokens_per_s_1', '-')} / "
                 f"{s.get('decode_tokens_per_s_3', '-')} | |",
                 f"| serve {v} | bare model.generate, same loading: decode tokens/s; engine / bare | "
                 f"{bare.get('decode_tokens_per_s', bare.get('skipped', '-'))}; {ratio:.2f} | |",
                 f"| serve {v} | /v1/classify items/s, 1 / 32 a call; generating the label | "
                 f"{dig(cls, 'label scoring, 1 text a call', 'items_per_s')} / {dig(cls, 'label scoring, 32 texts a call', 'items_per_s')}; "
                 f"{dig(cls, 'generating the label (chat, greedy)', 'items_per_s')} | |",
                 f"| serve {v} | peak allocated + CUDA context (GiB) | {mem.get('peak_allocated_gib', mem.get('rss_gib'))} + "
                 f"{mem.get('context_gib', 0)} | {e.get('total_gib')} |"]
    t = result.get("train")
    if t:
        rows.append(f"| train qlora | micro-batch x tokens; peak allocated + CUDA context (GiB); tokens/s | "
                    f"{t.get('batch')} x {t.get('tokens_per_example')}; {t.get('peak_memory_gib', t.get('skipped'))} + "
                    f"{t.get('cuda_context_gib', 0)}; {t.get('tokens_per_second')} | {est.get('train_qlora_gib')} |")
    if "merge" in result:
        m = result["merge"]
        rows.append(f"| merge | where it runs; peak RSS, wall time | {m['device']}; {m.get('peak_rss_gib', '-')} "
                    f"GiB, {m.get('seconds', '-')} s | |")
    return "\n".join(rows) + "\n"


def run(cfg, args) -> dict:
    started, out = time.monotonic(), Path(args.output_dir)
    args.left = lambda: (args.deadline_s or float("inf")) - (time.monotonic() - started)
    out.mkdir(parents=True, exist_ok=True)
    args.env = {"QWEN_PROFILE": "none", "QWEN_SERVE_MAX_PROMPT_TOKENS": str(max(args.prompt_tokens, 512)),
                **({"QWEN_MODEL_GPU_MEMORY_CAP_GIB": str(args.gpu_memory_gib)} if args.gpu_memory_gib else {})}
    for variant in args.quant or ():
        variant_env(variant)  # a bad --quant fails before the build
    model_dir = build_shape(args.shape, cfg, Path(args.shape_dir) if args.shape_dir else
                            cfg.resolve(f"models/shape-{args.shape}"))
    path = out / f"measure-{args.shape}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result |= {"shape": args.shape, "gpu_memory_gib": args.gpu_memory_gib, "machine": machine(),
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "decode_tokens": args.decode_tokens,
               "date": time.strftime("%Y-%m-%d"), "estimates": estimates(args.shape, cfg, args.gpu_memory_gib)}

    def save() -> None:  # every step that finished is kept, whatever happens to the next
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        (out / f"measure-{args.shape}.md").write_text(markdown(result), encoding="utf-8")
    args.save = save
    for part in args.only or ["serve", "train", "merge"]:
        print(f"measuring {part} ({args.left():.0f} s left) ...", flush=True)
        if part == "serve":
            serve_part(model_dir, args, out, result)
        elif part == "train":
            result["train"] = train_part(model_dir, args, out) if args.left() > 150 else {"skipped": "the deadline"}
        else:
            result["merge"] = merge_part(model_dir, args, out)
        save()
    return result


def add_args(parser) -> None:
    parser.add_argument("--shape", default="qwen3-8b", help="qwen3-8b (default), qwen3-4b, qwen3-14b or tiny")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="the card to emulate (10: an RTX 3080)")
    parser.add_argument("--only", action="append", choices=["serve", "train", "merge"], help="these parts only")
    parser.add_argument("--quant", action="append", help="serve part: these only, of 8bit@6 (LLM.int8, outlier threshold "
                        "6.0), 8bit@0 (threshold 0.0), 8bit (the config's threshold) and 4bit (NF4)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="the serving test's prompt (serve.max_prompt_tokens)")
    parser.add_argument("--new-tokens", type=int, default=512, help="generated per request (serve.max_tokens)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="generated per request for the decode rates")
    parser.add_argument("--deadline-s", type=float, help="start no step that cannot finish within this many seconds "
                        "of the start (a lent GPU's call limit)")
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
