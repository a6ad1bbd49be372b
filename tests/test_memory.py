"""The memory fit counts the module tree the loader builds: the tiny model's count equals its real bytes,
and the 8B defaults fit a 10 GiB card by construction."""
import json
import re

import pytest
from conftest import run_script

from common.model.loading import load_model
from common.model.memory import Placement, loaded_bytes, meta_model, weight_bytes


@pytest.mark.parametrize("placement", [Placement("none"), Placement("8bit"), Placement("8bit", quantize_lm_head=True),
                                       Placement("4bit"), Placement("4bit", quantize_lm_head=True)],
                         ids=["16bit", "8bit", "8bit-head", "nf4", "nf4-head"])
def test_meta_count_equals_the_loaded_model(tiny_model, placement):
    cfg = json.loads((tiny_model / "config.json").read_text())
    counted = weight_bytes(meta_model(cfg, placement, dtype_bytes=4), dtype_bytes=4)  # fp32 on the CPU
    model = load_model(tiny_model, placement.quantization, quantize_lm_head=placement.quantize_lm_head)
    assert type(model.lm_head).__name__ == ({"8bit": "Linear8bitLt", "4bit": "Linear4bit"}.get(
        placement.quantization) if placement.quantize_lm_head else "Linear")
    assert counted["gpu"] == loaded_bytes(model)["cpu"]  # "gpu" = the compute device, here the CPU


def test_8b_defaults_fit_a_10_gib_card_with_room_to_spare():
    proc = run_script("verify_setup.py", "--profile", "none", "--gpu-memory-gib", "10", "--quick", "--json")
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    serving, training = checks["serving fit"], checks["training fit"]
    assert serving["status"] == "PASS" and training["status"] == "PASS"
    assert "8bit (int8_threshold 6), lm_head quantized, embedding on cpu" in serving["detail"]
    weights = float(re.search(r"weights ([\d.]+) GiB", serving["detail"])[1])
    spare = float(re.search(r"\(\+([\d.]+) GiB to spare\)", serving["detail"])[1])
    assert weights <= 7.2 and spare >= 0.5
    assert "KV cache 7,680 tokens" in serving["detail"]  # 3 x (2048 + 512): the seed's limits, unchanged


def test_plain_8bit_would_not_fit_which_is_why_auto_moves_the_head_and_embedding():
    from common.config import load_config
    from common.model.memory import QWEN3_SHAPES, choose_placement, serving_fit
    serve = load_config(profile="none", use_env=False).serve
    shape = QWEN3_SHAPES["Qwen3-8B"]
    assert serving_fit(shape, Placement("8bit"), serve).total > 10.0
    assert choose_placement(shape, "8bit", serve, 10.0) == Placement("8bit", True, True)
    assert choose_placement(shape, "8bit", serve, 24.0) == Placement("8bit", False, False)  # room: left alone
    assert choose_placement(QWEN3_SHAPES["Qwen3-4B"], "8bit", serve, 4.0).quantize_lm_head is False  # tied head
