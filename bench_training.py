"""Training side by side: train_qwen.py and TRL's SFTTrainer on the same model, tokens, LoRA, batch,
steps and seed, answer-only loss on both, one after the other; then each adapter's test macro-F1.

    python bench_training.py --model /tmp/trlbench/tiny-qwen3 --set data.processed_dir=/tmp/trlbench/processed
    python bench_training.py ... --variants ours,ours-full,trl,trl-fair,trl-compact --max-steps 20
    python bench_training.py ... --micro          # one batch of 16: forward+backward of each loss path

Each variant trains in its own process (ours: train_qwen.py itself; TRL: `bench_training.py --side trl`), so
peak RSS (wait4) is that trainer's. Writes <output-dir>/bench_training.json (machine, versions, load average).
Needs requirements-bench.txt (trl). 2 CPU cores, 100 steps: ours 43-47 s, TRL's compact head 55 s (BENCHMARKS.md).
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from common.bench import machine
from common.cli import run_stage
from common.config import ROOT, UserError
from common.evaluation.classification_metrics import classification_metrics
from common.model.batching import left_pad, position_ids
from common.model.label_scoring import score_label_ids
from common.model.loading import load_model, load_tokenizer, pick_device, pick_dtype
from common.model.memory import QWEN3_SHAPES
from common.text.prepared import load_splits, read_labels
from common.text.prompts import IGNORE_INDEX, classification_ids, encode_records

STEPS = 100  # the bench's length when --max-steps is not given (the tiny profile trains 300)
NEVER = "1000000"  # eval/save steps beyond the run: no evaluation or checkpoint while the clock runs
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's fused head computes (loss + 2 metrics)
VARIANTS = {  # name -> what differs; the model, tokens, LoRA, optimizer, schedule and seed are the same
    "ours": "train_qwen.py as it is: output head on the answer tokens' positions only (a pre-hook on the head)",
    "ours-full": "train_qwen.py with the head on every position (the pre-hook moved after the head by a patch)",
    "trl": "SFTTrainer with its defaults: bf16 autocast, gradient checkpointing, fused head over every "
           "position (its path without Triton), entropy + top-1 accuracy each step",
    "trl-fair": "SFTTrainer with precision and gradient checkpointing as ours (fp32 and off on the CPU)",
    "trl-compact": "trl-fair + the fused head on the label positions only, as TRL runs it on CUDA/XPU",
}


# ----------------------------------------------------------------------------- shared set-up
def lora_config(t):
    from peft import LoraConfig
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=t.target_modules, modules_to_save=t.modules_to_save or None,
                      task_type="CAUSAL_LM")


def train_examples(cfg, tok) -> list[dict]:
    """The prompt contract's ids and answer-only labels: the very tokens train_qwen.py trains on."""
    processed = cfg.resolve(cfg.data.processed_dir)
    records = load_splits(processed, ("train",))["train"]
    return encode_records(tok, records, read_labels(processed), cfg.prompt)


def config_argv(args) -> list[str]:
    """The config flags this run was given, to hand on to train_qwen.py unchanged."""
    argv = [x for flag, v in (("--config", args.config), ("--profile", args.profile),
                              ("--model", args.cfg_model_path)) if v for x in (flag, v)]
    argv += [x for s in args.set for x in ("--set", s)]
    for name, value in vars(args).items():
        if name.startswith("cfg__") and value is not None:
            flag = name[5:].replace("_", "-")
            argv += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", value]
    return argv


# ----------------------------------------------------------------------------- the TRL side (a child process)
def sft_config(cfg, out: Path, variant: str, device: str):
    from trl import SFTConfig
    t, ours_bf16 = cfg.train, device == "cuda" and pick_dtype(device) == torch.bfloat16  # fp16 never on the CPU
    # "trl" leaves bf16 (True) and gradient_checkpointing (True) at SFTConfig's defaults
    as_ours = {} if variant == "trl" else {"bf16": ours_bf16, "activation_checkpointing": t.gradient_checkpointing}
    return SFTConfig(
        output_dir=str(out), seed=t.seed, data_seed=t.seed, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, optim=t.optimizer, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, logging_steps=t.logging_steps,
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=device == "cpu",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, **as_ours)


def compact_head() -> None:
    """TRL projects only the label positions when Triton runs its fold kernel (CUDA/XPU); elsewhere every
    position. Flip that one decision (the fold stays torch) to see TRL's GPU path on this CPU."""
    import trl.trainer.utils as trl_utils
    trl_utils._use_triton = lambda device: True


def trl_side(cfg, variant: str, out: Path) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer
    t, device = cfg.train, pick_device()
    set_seed(t.seed)  # as train_qwen.py: before the adapters are initialised
    model_path = cfg.resolve(cfg.model.path)
    tok = load_tokenizer(model_path)
    train = datasets.Dataset.from_list(train_examples(cfg, tok))  # input_ids + labels: TRL uses them as they are
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype(device))
    if variant == "trl-compact":
        compact_head()
    trainer = SFTTrainer(model=model, args=sft_config(cfg, out, variant, device), train_dataset=train,
                         processing_class=tok, peft_config=lora_config(t))
    trainer.train()
    trainer.save_model(str(out))  # the adapter, scored on the test split by the parent
    (out / "history.json").write_text(json.dumps(trainer.state.log_history, indent=1))  # the clock and the loss
    print(f"trained {trainer.state.global_step} steps; wrote {out}/")


def full_head_side(argv: list[str]) -> None:
    """train_qwen.py, run as its own __main__, with the head on every position: head_on's pre-hook is lifted
    while the model runs and picks the answer rows of the [B, T, V] logits after, so the loss sees the same
    tensors while the head's matmuls (forward and backward) and the logits cost what a full head costs."""
    import runpy
    from transformers.models.qwen3 import modeling_qwen3
    forward = modeling_qwen3.Qwen3ForCausalLM.forward

    @functools.wraps(forward)
    def every_position(self, *a, **kw):
        hooks = self.get_output_embeddings()._forward_pre_hooks
        lifted = dict(hooks)
        hooks.clear()
        out = forward(self, *a, **kw)
        hooks.update(lifted)
        for hook in lifted.values():  # the same row selection, on the last dim (V) instead of H
            out.logits = hook(None, (out.logits,))[0]
        return out

    modeling_qwen3.Qwen3ForCausalLM.forward = every_position
    sys.argv = [str(ROOT / "train_qwen.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


# ----------------------------------------------------------------------------- running the variants
def ours_argv(args, steps: int, out: Path, variant: str) -> list[str]:
    return [*config_argv(args), "--max-steps", str(steps), "--runs-dir", str(out), "--run-name", variant,
            "--eval-steps", NEVER, "--save-steps", NEVER, "--early-stopping-patience", "0",
            "--report-to", "[]", "--set", f"logging.dir={out / 'logs'}", "--force"]


def child_command(args, variant: str, steps: int, out: Path) -> list[str]:
    py = sys.executable
    if variant == "ours":
        return [py, str(ROOT / "train_qwen.py"), *ours_argv(args, steps, out, variant)]
    if variant == "ours-full":
        return [py, __file__, "--side", variant, "--", *ours_argv(args, steps, out, variant)]
    return [py, __file__, *config_argv(args), "--max-steps", str(steps), "--side", variant,
            "--output-dir", str(out / variant)]


def run_child(cmd: list[str]) -> dict:
    """Run one variant to its end, sampling the 1-minute load average; its own peak RSS from wait4."""
    proc, loads, start = subprocess.Popen(cmd, cwd=ROOT), [], time.time()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        loads.append(os.getloadavg()[0])
        time.sleep(2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}; its output above says why")
    return {"process_seconds": round(time.time() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 2),
            "load_mean": round(statistics.mean(loads or [0]), 2), "load_max": round(max(loads or [0]), 2)}


def read_run(run_dir: Path) -> dict:
    """The Trainer's own clock at the last training log (train_runtime since the first step, before the
    end-of-run evaluation and checkpoint train_qwen.py makes), non-padding tokens/s, and the loss: the
    last logged window's and the whole run's mean."""
    history = json.loads((run_dir / "history.json").read_text())
    last = [h for h in history if "loss" in h][-1]
    mean = next(h["train_loss"] for h in history if "train_loss" in h)
    return {"train_seconds": round(last["train_runtime"], 1), "steps": last["step"],
            "tokens_per_second": round(last["num_input_tokens_seen"] / last["train_runtime"], 1),
            "final_loss": round(last["loss"], 4), "mean_train_loss": round(mean, 4)}


def test_macro_f1(cfg, adapter: Path) -> dict:
    """Both adapters through the same label scoring (common/model/label_scoring.py) on the test split."""
    processed, model_path = cfg.resolve(cfg.data.processed_dir), cfg.resolve(cfg.model.path)
    labels, test = read_labels(processed), load_splits(processed, ("test",))["test"]
    tok = load_tokenizer(model_path)
    model = load_model(model_path, adapter=adapter).eval()
    prompts = classification_ids(tok, [r["text"] for r in test], labels, cfg.prompt)
    scores = score_label_ids(model, tok, prompts, labels, cfg.train.eval_batch_size)
    m = classification_metrics([r["label"] for r in test], [labels[i] for i in scores.best()[0]], labels)
    return {"test_macro_f1": round(m["macro_f1"], 4), "test_accuracy": round(m["accuracy"], 4)}


def side_by_side(cfg, args, out: Path) -> dict:
    steps, results = cfg.train.max_steps if args.cfg__max_steps is not None else STEPS, {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise UserError(f"--variants: '{variant}' is not one of {', '.join(VARIANTS)}")
        print(f"\n=== {variant}: {VARIANTS[variant]}", flush=True)
        cmd, run_dir = child_command(args, variant, steps, out), out / variant
        results[variant] = {"what": VARIANTS[variant], "command": " ".join(cmd), **run_child(cmd),
                            **read_run(run_dir), **test_macro_f1(cfg, run_dir)}
        (out / "bench_training.json").write_text(json.dumps(header(cfg, steps) | {"runs": results}, indent=2))
    return header(cfg, steps) | {"runs": results}


SAME = ("batch_size", "grad_accum", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "optimizer",
        "lora_r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "seed", "group_by_length")


def header(cfg, steps: int | None) -> dict:
    from importlib.metadata import version  # the installed distributions' versions, as pip lists them
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": cfg.model.path,
            "versions": {name: version(name) for name in ("torch", "transformers", "peft", "trl")},
            "settings": {"steps": steps, **{k: getattr(cfg.train, k) for k in SAME}}}


# ----------------------------------------------------------------------------- one batch, each loss path
def answer_only_loss(model, b):
    """train_qwen.py's compute_loss (a stage imports no stage): the head on the answer positions only."""
    targets = b["labels"][:, 1:]
    answer = targets != IGNORE_INDEX
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][:, :-1][answer],))
    logits = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    hook.remove()
    return torch.nn.functional.cross_entropy(logits.float(), targets[answer])


def full_logits_loss(model, b):
    return model(**b).loss  # transformers' own loss: [B, T, V] logits, upcast to fp32, every position


def body_loss(model, b):
    hidden = model.get_base_model().model(b["input_ids"], attention_mask=b["attention_mask"],
                                          position_ids=b["position_ids"]).last_hidden_state
    return hidden.float().pow(2).mean()  # something to differentiate, without the head


def trl_loss(model, b):
    return model(**b, fused_lm_head=True).loss  # SFTTrainer.compute_loss's forward (num_items = its mask)


MICRO = [  # (what, loss, padding, {outputs, bf16, gradient checkpointing, compact})
    ("body alone (no output head)", body_loss, "left", {}),
    ("ours: head on the answer positions (pre-hook)", answer_only_loss, "left", {}),
    ("full-sequence logits (transformers' own loss)", full_logits_loss, "left", {}),
    ("TRL fused head, every position, log-probs only", trl_loss, "right", {"outputs": ("log_probs",)}),
    ("TRL fused head, every position, + entropy/top-1 (trl-fair)", trl_loss, "right", {}),
    ("  + bf16 autocast", trl_loss, "right", {"bf16": True}),
    ("  + gradient checkpointing (TRL's defaults)", trl_loss, "right", {"bf16": True, "gc": True}),
    ("TRL fused head, label positions only (trl-compact)", trl_loss, "right", {"compact": True}),
]


def micro_batches(cfg, tok, n: int) -> dict:
    """One batch of n training examples (seeded), left-padded as ours and right-padded as TRL's collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    examples = random.Random(cfg.train.seed).sample(train_examples(cfg, tok), n)
    ids, mask = left_pad([e["input_ids"] for e in examples], tok.pad_token_id)
    labels, _ = left_pad([e["labels"] for e in examples], IGNORE_INDEX)
    right = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    return {"left": {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "labels": labels},
            "right": right}


def timed(model, loss_fn, batch, opts: dict, repeats: int) -> tuple[float, float]:
    """Median seconds of forward+backward (after one warm-up), and the loss (paths must agree on it)."""
    import trl.trainer.utils as trl_utils
    base, use_triton = model.get_base_model(), trl_utils._use_triton
    if loss_fn is trl_loss:
        trl_utils.add_fused_lm_head(base, outputs=opts.get("outputs", TRL_OUTPUTS))
    if opts.get("compact"):
        compact_head()
    if opts.get("gc"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if opts.get("bf16") else nullcontext():
            loss = loss_fn(model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
    if loss_fn is trl_loss:
        del base.forward  # the class's forward again
    trl_utils._use_triton = use_triton
    if opts.get("gc"):
        base.gradient_checkpointing_disable()
        base.disable_input_require_grads()
    return statistics.median(times[1:]), loss.item()


def micro(cfg, out: Path, repeats: int) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed
    set_seed(cfg.train.seed)
    model_path = cfg.resolve(cfg.model.path)
    tok = load_tokenizer(model_path)
    batches = micro_batches(cfg, tok, cfg.train.batch_size)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype("cpu"))  # fp32, as both trainers on CPU
    model = get_peft_model(base, lora_config(cfg.train)).train()
    timed(model, answer_only_loss, batches["left"], {}, 1)  # the process's first passes pay for allocations
    rows = []
    for what, fn, padding, opts in MICRO:
        seconds, loss = timed(model, fn, batches[padding], opts, repeats)
        rows.append({"path": what, "seconds": round(seconds, 3), "loss": round(loss, 4)})
        print(f"{what:<62} {seconds:8.3f} s  loss {loss:.4f}  (load {os.getloadavg()[0]:.2f})", flush=True)
    shape = tuple(batches["left"]["input_ids"].shape)
    result = header(cfg, None) | {"batch": shape, "repeats": repeats, "micro": rows, "8b": shape_8b()}
    (out / "bench_training_micro.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- the 8B, from FLOPs and bytes
def shape_8b(seq: int = 512, answer: int = 4) -> dict:
    """Qwen3-8B's output head against its body, per 512-token sample with a ~4-token label (+<|im_end|>;
    ours projects one row more, the position after it): forward FLOPs (2 x multiply-adds; causal attention
    scores counted half), a LoRA step's (frozen base: backward ~ the forward's input gradients, gradient
    checkpointing adds a body forward), and the logits' bytes."""
    s = QWEN3_SHAPES["Qwen3-8B"]
    h, v, q, kv = s["hidden_size"], s["vocab_size"], s["num_attention_heads"] * s["head_dim"], \
        s["num_key_value_heads"] * s["head_dim"]
    per_layer = 2 * seq * (h * (2 * q + 2 * kv) + 3 * h * s["intermediate_size"]) + 2 * seq * seq * q
    body, rows = s["num_hidden_layers"] * per_layer, {"full": seq, "answer-only": answer + 2}
    out = {"seq": seq, "answer_tokens": answer, "body_forward_tflop": round(body / 1e12, 3)}
    for name, n in rows.items():
        head = 2 * n * h * v
        out[name] = {"head_rows": n, "head_forward_tflop": round(head / 1e12, 4),
                     "head_share_forward": round(head / (body + head), 4),
                     "head_share_step_gc": round(2 * head / (3 * body + 2 * head), 4),
                     "head_share_step_no_gc": round(2 * head / (2 * body + 2 * head), 4),
                     "logits_gb_bf16": round(n * v * 2 / 1e9, 4), "logits_gb_fp32": round(n * v * 4 / 1e9, 4)}
    return out


# ----------------------------------------------------------------------------- the report
def table(result: dict) -> str:
    runs = result["runs"]
    base = runs.get("ours", next(iter(runs.values())))
    lines = ["| variant | train runtime | non-padding tokens/s | peak RSS | final loss (mean) | test macro-F1 "
             "| runtime / ours | load mean (max) |", "| --- " * 8 + "|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['train_seconds']} s | {r['tokens_per_second']:,.0f} | {r['peak_rss_gib']} GiB "
                     f"| {r['final_loss']} ({r['mean_train_loss']}) | {r['test_macro_f1']:.3f} "
                     f"| {r['train_seconds'] / base['train_seconds']:.2f}x | {r['load_mean']} ({r['load_max']}) |")
    return "\n".join(lines)


def report(result: dict | None) -> None:
    if result is None:  # a child: its parent reports
        return
    print(f"\nmachine: {result['machine']}; {result['versions']}; {result['settings']}")
    if "runs" in result:
        print(table(result))
    if "8b" in result:
        print(json.dumps(result["8b"], indent=1))
    print(f"wrote {result['written']}")


def run(cfg, args) -> dict | None:
    if args.side == "ours-full":
        return full_head_side(args.rest)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.side:
        trl_side(cfg, args.side, out)
        return None
    if args.micro:
        return micro(cfg, out, args.repeats) | {"written": str(out / "bench_training_micro.json")}
    return side_by_side(cfg, args, out) | {"written": str(out / "bench_training.json")}


def add_args(parser) -> None:
    parser.add_argument("--variants", default="ours,trl", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--output-dir", default=str(ROOT / "logs" / "bench_training"), help="runs, adapters, JSON")
    parser.add_argument("--micro", action="store_true", help="time one batch's forward+backward per loss path")
    parser.add_argument("--repeats", type=int, default=3, help="--micro: timed repeats per path (median)")
    parser.add_argument("--side", choices=["trl", "trl-fair", "trl-compact", "ours-full"], help="(internal) one child")
    parser.add_argument("rest", nargs="*", help="(internal) --side ours-full: train_qwen.py's arguments, after --")


def main(argv=None) -> int:
    return run_stage("bench_training", __doc__, run, section="train", model_help="base model directory",
                     add_args=add_args, report=report, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
