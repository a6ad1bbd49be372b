"""The types of config.yaml's keys, one dataclass a section: the values (and the comment on each)
live in config.yaml only; common/config.py reads, overlays and checks them against these."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelConfig:
    path: str
    gpu_memory_cap_gib: float | None
    int8_threshold: float


@dataclass
class PromptConfig:
    system: str
    user_template: str
    label_separator: str
    enable_thinking: bool


@dataclass
class DownloadConfig:
    source: str
    repo_id: str
    revision: str
    local_dir: str | None
    tiny_dir: str


@dataclass
class TinyConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    shard_size: str
    seed: int


@dataclass
class DataConfig:
    input: str
    encoding: str
    sheet: str | None
    processed_dir: str
    text_col: str | None
    label_col: str | None
    val_ratio: float
    test_ratio: float
    seed: int
    max_tokens: int
    overlong: str
    min_per_class: int


@dataclass
class TrainConfig:
    method: str
    run_name: str | None
    runs_dir: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    modules_to_save: list[str]
    learning_rate: float
    optimizer: str
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    epochs: float
    max_steps: int
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    group_by_length: bool
    eval_steps: int
    save_steps: int
    save_total_limit: int
    early_stopping_patience: int
    eval_max_items: int
    eval_batch_size: int
    calibration_items: int
    logging_steps: int
    seed: int
    deterministic: bool
    report_to: list[str]


@dataclass
class EvaluateConfig:
    model: str | None
    quantization: str
    split: str
    batch_size: int
    generate: bool
    max_new_tokens: int


@dataclass
class VerifyConfig:
    min_free_disk_gb: float
    gpu_memory_gib: float | None
    ram_gib: float | None


@dataclass
class MergeConfig:
    adapter: str | None
    output: str | None
    shard_size: str
    tolerance: float | None
    verify_items: int


@dataclass
class QuantizeConfig:
    model: str | None
    bits: int
    lm_head: str
    output: str | None
    compare_items: int


@dataclass
class ServeConfig:
    host: str
    port: int
    front: str
    model: str | None
    adapter: str | None
    served_model_name: str | None
    quantization: str
    lm_head: str
    embedding_device: str
    max_concurrent: int
    max_queue: int
    max_queue_wait_s: float
    request_timeout_s: float
    max_tokens: int
    default_max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    max_prompt_tokens: int
    max_prefill_tokens: int
    kv_budget_tokens: int | None
    max_body_bytes: int
    max_stop: int
    max_classify_texts: int
    max_labels: int
    rate_limits: str
    global_rate_limit: str
    rate_limit_storage: str
    rate_limit_storage_down: str
    rate_limit_storage_timeout_s: float
    rate_limit_storage_retry_s: float
    trusted_proxies: int
    api_keys: list[str]
    api_keys_file: str | None
    auth_failure_limit: str
    retry_after_busy_s: int
    retry_after_unavailable_s: int
    unhealthy_after_failures: int
    unhealthy_window_s: float
    batch_wait_ms: float
    log_prompts: bool
    workers: int
    graceful_timeout_s: float


@dataclass
class LoggingConfig:
    dir: str
    level: str


@dataclass
class Config:
    profile: str | None
    model: ModelConfig
    prompt: PromptConfig
    download: DownloadConfig
    tiny: TinyConfig
    data: DataConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    merge: MergeConfig
    quantize: QuantizeConfig
    verify: VerifyConfig
    serve: ServeConfig
    logging: LoggingConfig

    def resolve(self, path: str | os.PathLike) -> Path:
        """Config paths are relative to the repo root, so scripts work from any directory."""
        p = Path(path)
        return p if p.is_absolute() else ROOT / p
