"""LoRA / QLoRA fine-tuning of a Qwen3 model on data/processed (prepare_data.py's output).

    python train_qwen.py                                   # config.yaml's train section -> models/<run>/
    python train_qwen.py --method qlora --run-name news-qlora --learning-rate 1e-4
    python train_qwen.py --resume                          # continue the newest run from its last checkpoint
    accelerate launch --num_processes 2 train_qwen.py      # the same script on several GPUs (DDP)
    python train_qwen.py --calibrate-only models/<run>     # only fit calibration.json (a run trained without it)

Writes models/<run>/: the best adapter (safetensors), tokenizer + chat template, labels.json,
config.resolved.yaml, train_info.json (data hash, figures, best metric; written last) and
calibration.json (the label probabilities' temperature, fitted on the val split), checkpoints/; JSON-lines
log in logs/train_qwen.jsonl; TensorBoard in logs/tensorboard/<run>/. The loss sees only the answer
tokens (label + <|im_end|>), through the prompt contract.
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from common.cli import add_force, run_stage
from common.config import ConfigError
from common.evaluation.calibration import calibrate_run, recalibrate, summary_line
from common.evaluation.classification_metrics import classification_metrics
from common.evaluation.plots import save_training_curves
from common.evaluation.provenance import run_provenance
from common.evaluation.tracking import log_training, tracking_facts, training_run
from common.evaluation.training_health import make_monitor
from common.model.batching import left_pad, position_ids
from common.model.label_scoring import score_label_ids
from common.model.loading import (TRAIN_METHODS, cap_gpu_memory, gpu_free_bytes, load_tokenizer, peak_memory,
                                  pick_device, pick_dtype, quantization_config)
from common.model.memory import model_shape, training_fit
from common.text.prepared import LABELS_FILE, data_hash, load_splits, read_labels
from common.text.prompts import IGNORE_INDEX, classification_ids, encode_records

log = logging.getLogger("train_qwen")


# ----------------------------------------------------------------------------- data
class LeftPadCollator:
    """Left padding, the one rule every stage pads by (common/model/batching.py). Counts real and padded
    tokens for the padding ratio from the lengths it pads, in Python: no tensor op per batch."""

    def __init__(self, pad_id: int):
        self.pad_id, self.real, self.total = pad_id, 0, 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([f["input_ids"] for f in features], self.pad_id)
        labels, _ = left_pad([f["labels"] for f in features], IGNORE_INDEX)
        self.real += sum(len(f["input_ids"]) for f in features)
        self.total += ids.numel()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids(mask)}

    @property
    def padding_ratio(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


# ----------------------------------------------------------------------------- the trainer
@contextlib.contextmanager
def head_on(model, answer: torch.Tensor):
    """The output head on the answer positions only: [n, H] rows in, [n, V] logits out, instead of
    [B, T, V]. The 151,936-wide head, not the body, is where a small model spends its step; an answer is
    ~2 tokens, so a row of the answer span or a position that predicts nothing would be wasted work, and
    [B, T, V] logits past 32 MB are fresh pages the kernel zeroes each step (glibc maps them). A forward
    pre-hook, so that model(...) still runs as a whole (DDP's wrapper, gradient checkpointing)."""
    head = getattr(model, "module", model).get_output_embeddings()  # DDP wraps the model in .module
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][:, :-1][answer],))
    try:
        yield
    finally:
        hook.remove()


def make_trainer_class():
    from transformers import Trainer

    class AnswerOnlyTrainer(Trainer):
        """Loss over the answer positions only, and label-scoring metrics at each evaluation."""

        def __init__(self, *args, val_records=None, labels=None, prompt_cfg=None, eval_batch_size=8, health=None,
                     **kw):
            super().__init__(*args, **kw)
            self.health = health  # common/evaluation/training_health.py's monitor: what the predictions say, at each evaluation
            self.model_accepts_loss_kwargs = False  # mean loss per micro-batch; Trainer scales for accumulation
            self.val_records, self.label_set, self.prompt_cfg = val_records or [], labels or [], prompt_cfg
            self.score_batch_size = eval_batch_size

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("labels")[:, 1:]  # position t predicts token t + 1
            answer = targets != IGNORE_INDEX        # [B, T-1]: the positions the loss sees
            with head_on(model, answer):
                logits = model(**inputs).logits.float()  # [n answer tokens, V]
            loss = torch.nn.functional.cross_entropy(logits, targets[answer])
            return (loss, {"logits": logits}) if return_outputs else loss

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
            if self.label_set and self.val_records:
                output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.label_metrics().items()})
            return output

        def label_metrics(self) -> dict[str, float]:
            tok = self.processing_class
            prompts = classification_ids(tok, [r["text"] for r in self.val_records], self.label_set, self.prompt_cfg)
            was_training = self.model.training
            self.model.eval()
            scores = score_label_ids(self.model, tok, prompts, self.label_set, self.score_batch_size)
            self.model.train(was_training)
            predicted, truth = [self.label_set[i] for i in scores.best()[0]], [r["label"] for r in self.val_records]
            m = classification_metrics(truth, predicted, self.label_set)
            if self.health is not None:
                self.health.predictions(truth, predicted, self.label_set, m["macro_f1"], self.state.global_step)
            return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    return AnswerOnlyTrainer


# ----------------------------------------------------------------------------- the model
def build_model(model_path: Path, tcfg, device: str, int8_threshold: float | None = None):
    """The base in the method's precision (lora8: with model.int8_threshold) with LoRA adapters on the
    target projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quant = TRAIN_METHODS[tcfg.method]
    dtype = pick_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, quantization_config=quantization_config(quant, dtype, int8_threshold=int8_threshold),
        device_map={"": device} if quant != "none" else None, low_cpu_mem_usage=True)
    model.config.use_cache = False  # the cache is useless in training and costs memory
    if tcfg.gradient_checkpointing:
        # instead of peft's prepare_model_for_kbit_training, which upcasts the 16-bit embedding and
        # output head to fp32 (+2.3 GiB on the 8B): only make the inputs require grad for checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                      target_modules=tcfg.target_modules, modules_to_save=tcfg.modules_to_save or None,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def check_memory(model_path: Path, tcfg, encoded: list[dict], device: str, cap_gib: float | None) -> str:
    """Estimate the peak of the longest batch; on a GPU, refuse a run that cannot fit, saying what would."""
    shape = model_shape(model_path)
    seq = max(len(e["input_ids"]) for e in encoded)
    answer = max(sum(x != IGNORE_INDEX for x in e["labels"]) for e in encoded)
    fit = training_fit(shape, TRAIN_METHODS[tcfg.method], tcfg, seq, answer)
    text = f"memory estimate for {tcfg.method}, batch {tcfg.batch_size} x {seq} tokens: {fit.describe()}"
    if device != "cuda":
        return text
    free = gpu_free_bytes(cap_gib) / 1024**3
    if fit.total <= free:
        return f"{text} (free {free:.1f} GiB)"
    if tcfg.method == "lora":
        hint = "use --method qlora (4-bit base)"
    elif not tcfg.gradient_checkpointing:
        hint = "turn on --gradient-checkpointing"
    else:
        hint = f"lower --batch-size (raise --grad-accum to keep the effective batch {tcfg.batch_size * tcfg.grad_accum})"
    raise ConfigError(f"{text} does not fit the {free:.1f} GiB free on the GPU; {hint}")


# ----------------------------------------------------------------------------- the run
def run_paths(cfg, resume: bool, force: bool) -> tuple[Path, str | None]:
    """The run directory and, with --resume, its newest checkpoint; never clobbers a run silently."""
    t = cfg.train
    run_dir = cfg.resolve(t.runs_dir) / (t.run_name or f"{Path(cfg.model.path).name}-{t.method}")
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if resume:
        if not checkpoints:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint to continue from")
        return run_dir, str(checkpoints[-1])
    if run_dir.exists() and not force:
        raise ConfigError(f"{run_dir} already exists; pass --resume to continue it, --run-name NEW for "
                          f"another run, or --force to replace it")
    return run_dir, None


def training_arguments(cfg, run_dir: Path, device: str, classification: bool):
    from transformers import TrainingArguments
    t, dtype = cfg.train, pick_dtype(device)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, optim=t.optimizer,
        lr_scheduler_type=t.lr_scheduler,
        # transformers reads a warmup_steps value below 1 as a fraction of the total steps: the ratio
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, num_train_epochs=t.epochs, max_steps=t.max_steps,
        eval_strategy="steps", eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, load_best_model_at_end=True,
        metric_for_best_model="macro_f1" if classification else "loss", greater_is_better=classification,
        logging_steps=t.logging_steps, report_to=t.report_to or "none",
        bf16=device == "cuda" and dtype == torch.bfloat16, fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu", train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False, prediction_loss_only=True, ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, so the health monitor sees it
    )


def save_run(trainer, run_dir: Path, cfg, processed: Path, info: dict) -> None:
    """The best adapter and everything needed to reproduce and use it; train_info.json goes last."""
    trainer.model.save_pretrained(run_dir)
    adapter_cfg = run_dir / "adapter_config.json"
    a = json.loads(adapter_cfg.read_text())
    a["base_model_name_or_path"] = cfg.model.path  # as config.yaml names it: the repo can move
    adapter_cfg.write_text(json.dumps(a, indent=2))
    trainer.processing_class.save_pretrained(run_dir)
    (run_dir / LABELS_FILE).write_bytes((processed / LABELS_FILE).read_bytes())
    (run_dir / "config.resolved.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(cfg), allow_unicode=True, sort_keys=False), encoding="utf-8")
    (run_dir / "history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    save_training_curves(trainer.state.log_history, run_dir, trainer.state.best_model_checkpoint)
    (run_dir / "train_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))


def make_log_callback():
    from transformers import TrainerCallback

    class JsonLog(TrainerCallback):
        """Every Trainer log line (loss, lr, eval metrics) also goes to logs/train_qwen.jsonl."""

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                log.debug("step %d", state.global_step, extra={"step": state.global_step, **logs})

    return JsonLog()


def training_inputs(cfg) -> tuple[Path, Path]:
    """(base model dir, prepared data dir), after the checks that need no model loaded."""
    import importlib.util
    t = cfg.train
    if t.method not in TRAIN_METHODS:
        raise ConfigError(f"train.method must be one of {', '.join(TRAIN_METHODS)}, got '{t.method}'")
    for reporter in t.report_to:
        if importlib.util.find_spec(reporter) is None:
            raise ConfigError(f"train.report_to names {reporter}, which is not installed: pip install {reporter}")
    model_path = cfg.resolve(cfg.model.path)
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"no model at {model_path}; run python download_model.py (--tiny for the CPU demo)")
    return model_path, cfg.resolve(cfg.data.processed_dir)


def trainable_model(model_path: Path, tcfg, device: str, int8_threshold: float | None = None):
    """build_model, with what is trained in fp32 (whatever the base dtype), and its size logged."""
    model = build_model(model_path, tcfg, device, int8_threshold)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s (%.2f%% of %s)", f"{n_train:,}", 100 * n_train / n_all, f"{n_all:,}")
    return model, n_train


def make_trainer(cfg, model, tokenizer, splits, encoded, labels, run_dir: Path, device: str):
    from transformers import EarlyStoppingCallback
    t = cfg.train
    val_sample = random.Random(t.seed).sample(splits["val"], min(t.eval_max_items, len(splits["val"]))) \
        if labels else []
    stopping = [EarlyStoppingCallback(t.early_stopping_patience)] if t.early_stopping_patience > 0 else []
    health = make_monitor()
    return make_trainer_class()(
        model=model, args=training_arguments(cfg, run_dir, device, bool(labels)), train_dataset=encoded["train"],
        eval_dataset=encoded["val"], data_collator=LeftPadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=[make_log_callback(), health, *stopping], health=health,
        val_records=val_sample, labels=labels, prompt_cfg=cfg.prompt, eval_batch_size=t.eval_batch_size)


def seed_everything(tcfg) -> None:
    """Before anything draws a random number (the adapters' initialisation included): the same config,
    data and seed give the same adapter. train.deterministic also makes CUDA pick deterministic kernels."""
    from transformers import enable_full_determinism, set_seed
    if tcfg.deterministic:
        enable_full_determinism(tcfg.seed)
    else:
        set_seed(tcfg.seed)


def run(cfg, resume: bool = False, force: bool = False) -> dict:
    """Train the adapter config.yaml's train section describes; returns the run's figures."""
    t, device = cfg.train, pick_device()
    seed_everything(t)
    cap_gpu_memory(cfg.model.gpu_memory_cap_gib)
    model_path, processed = training_inputs(cfg)
    run_dir, resume_from = run_paths(cfg, resume, force)
    splits = load_splits(processed, ("train", "val"))
    labels = read_labels(processed)
    tokenizer = load_tokenizer(model_path)
    encoded = {s: encode_records(tokenizer, recs, labels, cfg.prompt) for s, recs in splits.items()}
    log.info(check_memory(model_path, t, encoded["train"], device, cfg.model.gpu_memory_cap_gib))
    if resume_from is None and run_dir.exists():
        shutil.rmtree(run_dir)  # --force, checked in run_paths
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(cfg.resolve(cfg.logging.dir) / "tensorboard" / run_dir.name))
    model, n_train = trainable_model(model_path, t, device, cfg.model.int8_threshold)
    trainer = make_trainer(cfg, model, tokenizer, splits, encoded, labels, run_dir, device)
    rank0 = trainer.is_world_process_zero()  # under accelerate, one MLflow run: rank 0's
    with training_run(t.report_to if rank0 else [], run_dir.name, {"run_dir": run_dir}) as tracked:
        start = time.time()
        result = trainer.train(resume_from_checkpoint=resume_from)
        seconds = time.time() - start
        figures = {
            "base_model": cfg.model.path, "method": t.method, "data_sha256": data_hash(processed, ("train", "val")),
            "task": "classification" if labels else "chat", "labels": labels or [],
            "global_step": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_metric": trainer.state.best_metric, "final_eval": trainer.evaluate(),
            "train_seconds": round(seconds, 1),
            "tokens_per_second": round(trainer.state.num_input_tokens_seen / seconds, 1),
            "samples_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 2),
            "padding_ratio": round(trainer.data_collator.padding_ratio, 4), "trainable_parameters": n_train,
            **peak_memory(device), "device": device,
            "provenance": run_provenance(cfg, processed, model_path, device,
                                         str(pick_dtype(device)).removeprefix("torch.")),
            "health": [dataclasses.asdict(f) for f in trainer.health.findings],
            "ended_degenerate": [dataclasses.asdict(f) for f in trainer.health.ended_degenerate()],
        }
        if rank0:
            if labels:  # the best model is loaded (load_best_model_at_end): its probabilities are calibrated
                figures["calibration"] = calibrate_run(run_dir, trainer.model, tokenizer, splits["val"], labels, cfg)
            figures.update(tracking_facts(tracked))
            save_run(trainer, run_dir, cfg, processed, figures)
            log_training(tracked, run_dir, figures)
    return figures | {"run_dir": str(run_dir)}


def report(figures: dict, strict: bool = False) -> int:
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun, rank 0 reports for all
        return 0
    ev = figures["final_eval"]
    score = f"macro-F1 {ev['eval_macro_f1']:.3f}, accuracy {ev['eval_accuracy']:.3f}" if "eval_macro_f1" in ev \
        else f"loss {ev['eval_loss']:.4f}"
    print(f"\ntrained {figures['global_step']} steps in {figures['train_seconds']:.0f}s: "
          f"{figures['tokens_per_second']:.0f} tokens/s, {figures['samples_per_second']:.1f} samples/s, "
          f"padding {100 * figures['padding_ratio']:.1f}%, peak memory {figures['peak_memory_gib']:.2f} GiB")
    print(f"best on val: {score} ({figures['best_checkpoint']})")
    if "calibration" in figures:
        print(summary_line(figures["calibration"]))
    print(f"wrote {figures['run_dir']}/ (adapter, tokenizer, labels.json, calibration.json, config.resolved.yaml, "
          f"train_info.json, curves_loss.png, curves_metrics.png)")
    degenerate = figures["ended_degenerate"]
    for f in degenerate:
        print(f"WARNING: this run ended degenerate: {f['finding']} (step {f['step']}). Likely: {f['cause']}. "
              f"Fix: {f['fix']}")
    died = math.isnan(ev.get("eval_loss", 0.0)) or any(f.get("level") == "error" for f in degenerate)
    return 1 if died or (degenerate and strict) else 0


def add_args(parser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    add_force(parser, "run directory")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the run ends degenerate (health findings)")
    parser.add_argument("--calibrate-only", metavar="RUN", help="train nothing: fit RUN's calibration.json")


def work(cfg, a) -> dict:
    if a.calibrate_only:
        run_dir = cfg.resolve(a.calibrate_only)
        return {"calibration": recalibrate(cfg, run_dir), "run_dir": str(run_dir), "calibrate_only": True}
    return {**run(cfg, a.resume, a.force), "strict": a.strict}


def main(argv=None) -> int:
    return run_stage("train_qwen", __doc__, work, section="train", model_help="base model directory",
                     add_args=add_args, argv=argv, report=lambda figures: print(
                         f"{summary_line(figures['calibration'])}\nwrote {figures['run_dir']}/calibration.json")
                     if figures.get("calibrate_only") else report(figures, figures["strict"]))


if __name__ == "__main__":
    sys.exit(main())
