"""Check that this machine can run the toolkit: packages, GPU, disk, model files, data, port, memory fit
(GPU memory for serving and training, RAM for each stage).

    python verify_setup.py                 # a PASS / WARN / FAIL table with a fix for each problem
    python verify_setup.py --json          # the same as JSON, for scripts
    python verify_setup.py --quick         # skip the model-load check (start_production.sh uses this)
    python verify_setup.py --profile none --gpu-memory-gib 10 --ram-gib 31   # the 8B on the card's box

Exit status 1 when any line FAILs. No GPU is a WARN: everything runs on a CPU, slowly.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cli import run_stage
from common.config import ROOT
from common.model.loading import TRAIN_METHODS
from common.model.memory import (GIB, RAM_PASS, choose_placement, effective_concurrency, kv_bytes_per_token,
                                 machine_ram_gib, model_shape, ram_fits, serving_fit, shard_bytes, training_fit)
from common.model.files import check_model_dir, serving_model


@dataclass
class Check:
    name: str
    status: str  # PASS | WARN | FAIL
    detail: str
    fix: str = ""


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)  # pyproject.toml's requires-python; numpy 2.4 needs it
    return Check("python", "PASS" if ok else "FAIL", sys.version.split()[0],
                 "" if ok else "use Python 3.11 or newer")


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def check_packages(requirements: Path) -> list[Check]:
    checks = []
    for name, pinned in read_pins(requirements).items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            checks.append(Check(name, "FAIL", "not installed", f"pip install -r {requirements.name}"))
            continue
        same = have.split("+")[0] == pinned  # torch 2.13.0+cu128 is the pinned 2.13.0
        checks.append(Check(name, "PASS" if same else "WARN", have if same else f"{have} (pinned {pinned})",
                            "" if same else f"pip install -r {requirements.name}"))
    return checks


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def check_accelerator() -> tuple[list[Check], float | None]:
    """torch's build and device; returns the GPU memory in GiB (None without a GPU)."""
    import torch
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gib = props.total_memory / GIB
        smi = nvidia_smi()
        detail = f"{props.name}, {gib:.1f} GiB, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        return [Check("torch", "PASS", build), Check("gpu", "PASS", detail + (f"; nvidia-smi: {smi}" if smi else ""))], gib
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return [Check("torch", "PASS", build), Check("gpu", "WARN", "Apple MPS: no bitsandbytes quantization",
                                                     "train with --method lora; serve with quantization none")], None
    hint = ("nvidia-smi sees a GPU but this torch has no CUDA: install torch's CUDA build (requirements.txt)"
            if nvidia_smi() else "training and serving run on the CPU, slowly; use a CUDA GPU for the 8B model")
    return [Check("torch", "PASS", build), Check("gpu", "WARN", "no CUDA or MPS device", hint)], None


def check_bitsandbytes() -> Check:
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as e:  # a broken native library raises more than ImportError
        return Check("bitsandbytes", "FAIL", f"import failed: {e}", "pip install -r requirements.txt")
    backend = "CUDA" if torch.cuda.is_available() else "CPU"
    return Check("bitsandbytes", "PASS", f"{bnb.__version__}, {backend} backend (8-bit and 4-bit)")


def check_disk(path: Path, min_gb: float) -> Check:
    free = shutil.disk_usage(path).free / 1e9
    ok = free >= min_gb
    return Check("disk", "PASS" if ok else "WARN", f"{free:.0f} GB free at {path}",
                 "" if ok else f"free at least {min_gb:.0f} GB (verify.min_free_disk_gb)")


def check_model(model_dir: Path) -> Check:
    if not model_dir.exists():
        return Check("model files", "FAIL", f"{model_dir} does not exist",
                     "python download_model.py (or --tiny for the CPU demo), or set model.path")
    findings = check_model_dir(model_dir)
    fails = [f.message for f in findings if f.level == "fail"]
    if fails:
        return Check("model files", "FAIL", f"{model_dir}: " + "; ".join(fails),
                     "download again: python download_model.py --force (--tiny for the demo model)")
    warns = [f.message for f in findings if f.level == "warn"]
    return Check("model files", "WARN" if warns else "PASS",
                 f"{model_dir}: " + ("; ".join(warns) if warns else "config, every shard, tokenizer, chat template"))


def check_model_loads(model_dir: Path) -> Check:
    """The tokenizer loads and renders the chat template; catches a broken tokenizer early."""
    try:
        from common.model.loading import load_tokenizer
        tok = load_tokenizer(model_dir)
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # anything here means serving and training would fail the same way
        return Check("tokenizer", "FAIL", f"{type(e).__name__}: {e}", "download the model again with --force")
    return Check("tokenizer", "PASS", f"{type(tok).__name__}, {len(tok)} tokens, chat template renders")


def check_data(cfg) -> list[Check]:
    src, processed = cfg.resolve(cfg.data.input), cfg.resolve(cfg.data.processed_dir)
    checks = [Check("data", "PASS" if src.is_file() else "WARN",
                    f"{src.relative_to(ROOT) if src.is_relative_to(ROOT) else src}" +
                    (" present" if src.is_file() else " missing"),
                    "" if src.is_file() else "point data.input at your CSV/JSON/JSONL, or run data/make_sample_news.py")]
    ready = (processed / "train.jsonl").is_file()
    checks.append(Check("prepared data", "PASS" if ready else "WARN",
                        f"{processed.name}/ {'ready' if ready else 'not prepared yet'}",
                        "" if ready else "python prepare_data.py"))
    return checks


def check_front(front: str) -> Check:
    """serve.front: what start_production.sh puts in front of gunicorn."""
    if front == "none":
        return Check("front", "PASS", "gunicorn alone (FRONT=nginx puts nginx in front for slow clients)")
    if front != "nginx":
        return Check("front", "FAIL", f"serve.front is '{front}'", "set FRONT / serve.front to none or nginx")
    found = shutil.which("nginx")
    return Check("front", "PASS" if found else "FAIL", f"nginx {'at ' + found if found else 'not installed'}",
                 "" if found else "sudo apt-get install nginx (or FRONT=none)")


def check_port(host: str, port: int) -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return Check("serving port", "WARN", f"{host}:{port} is in use",
                         "stop what holds it (a running server?) or set PORT / serve.port")
    return Check("serving port", "PASS", f"{host}:{port} is free")


def fit_check(name: str, text: str, total: float, card: float | None, fix: str, then: str = "") -> Check:
    if card is None:
        return Check(name, "WARN", text + " (no GPU to compare with)", "set verify.gpu_memory_gib to check a card")
    # counted from the module tree, but activations and the CUDA context are estimates: a small overshoot warns
    status = "PASS" if total <= card else "WARN" if total <= 1.1 * card else "FAIL"
    return Check(name, status, f"{text} vs {card:.1f} GiB ({card - total:+.2f} GiB to spare){then}",
                 "" if status == "PASS" else fix)


def check_memory_fit(cfg, model_dir: Path, gpu_gib: float | None) -> list[Check]:
    """Serving (the limits, 8-bit on a GPU) and training (train.method, batch x data.max_tokens) fits."""
    model_cfg, base_cfg = model_shape(model_dir), model_shape(cfg.resolve(cfg.model.path))
    if model_cfg is None or base_cfg is None:
        return [Check("memory fit", "WARN", f"no config.json in {model_dir} and not a known Qwen3 size")]
    s, t, card = cfg.serve, cfg.train, cfg.verify.gpu_memory_gib or gpu_gib
    placement = choose_placement(model_cfg, "8bit" if s.quantization == "auto" else s.quantization, s, card)
    fit = serving_fit(model_cfg, placement, s)
    threshold = f" (int8_threshold {cfg.model.int8_threshold:g})" if placement.quantization == "8bit" else ""
    layout = (f"{placement.quantization}{threshold}, lm_head {'quantized' if placement.quantize_lm_head else '16-bit'}, "
              f"embedding on {'cpu' if placement.embed_on_cpu else 'gpu'}")
    runs = ""
    if card is not None:
        n, why = effective_concurrency(fit.budget_tokens(card, kv_bytes_per_token(model_cfg)), s)
        runs = f"; {n} requests at their longest run at once, set by {why}"
    serving = fit_check("serving fit", f"{model_dir.name} ({layout}): {fit.describe()}", fit.total, card,
                        "lower serve.max_concurrent or the token caps, or serve 4bit", runs)
    train = training_fit(base_cfg, TRAIN_METHODS.get(t.method, "4bit"), t, cfg.data.max_tokens, 16)
    training = fit_check("training fit", f"{t.method} batch {t.batch_size} x {cfg.data.max_tokens} tokens: "
                         f"{train.describe()}", train.total, card,
                         "lower train.batch_size (raise grad_accum), data.max_tokens, or use method qlora")
    return [serving, training, *check_ram_fit(cfg, model_dir, model_cfg, fit, card)]


def check_ram_fit(cfg, model_dir: Path, shape: dict, fit, card: float | None) -> list[Check]:
    """RAM of each stage that runs on this box, against verify.ram_gib (--ram-gib) or this machine's."""
    ram = cfg.verify.ram_gib or machine_ram_gib()
    t = cfg.train
    fits = ram_fits(shape, shard_bytes(model_dir), fit, cfg.serve.workers, t.lora_r, t.target_modules, card)
    checks = []
    for f in fits:
        status = "PASS" if f.total <= RAM_PASS * ram else "WARN" if f.total <= ram else "FAIL"
        checks.append(Check(f"RAM {f.stage}", status, f"{f.describe()} vs {ram:.1f} GiB of RAM",
                            "" if status == "PASS" else f"{f.fix} (no swap: past the RAM the box freezes)"))
    return checks


def run(cfg, quick: bool = False, serving: bool = False) -> list[Check]:
    """Every check, in the order the table shows them."""
    model_dir = serving_model(cfg)[0] if serving else cfg.resolve(cfg.model.path)
    checks = [check_python(), *check_packages(ROOT / "requirements.txt")]
    accel, gpu_gib = check_accelerator()
    checks += accel + [check_bitsandbytes(), check_disk(ROOT, cfg.verify.min_free_disk_gb), check_model(model_dir)]
    if not quick and model_dir.exists():
        checks.append(check_model_loads(model_dir))
    checks += check_data(cfg) + [check_front(cfg.serve.front), check_port(cfg.serve.host, cfg.serve.port),
                                 *check_memory_fit(cfg, model_dir, gpu_gib)]
    return checks


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "PASS":
            print(f"{'':<5} {'':<{width}}  -> {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
    print(f"\n{counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failed")


def add_args(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--quick", action="store_true", help="skip loading the tokenizer")
    parser.add_argument("--serving", action="store_true",
                        help="check the model the service would load (serve.model / MODEL_PATH, the newest merge)")


def main(argv=None) -> int:
    def cli_run(cfg, args):
        checks = run(cfg, args.quick, args.serving)
        if args.json:
            print(json.dumps([asdict(c) for c in checks], indent=2, ensure_ascii=False))
        else:
            print_table(checks)
        return checks

    return run_stage("verify_setup", __doc__, cli_run, section="verify", model_help="model directory to check",
                     add_args=add_args, report=lambda checks: any(c.status == "FAIL" for c in checks), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
