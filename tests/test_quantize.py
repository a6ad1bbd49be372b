"""quantize_model.py: 8-bit and NF4 copies of a merged model that load quantized with no config passed,
answer with a valid label on the CPU, and report size, load time and agreement with the 16-bit model."""
import json
import re

import pytest
import torch
from conftest import run_script

from common.config import load_config
from common.model.files import check_model_dir
from common.model.label_scoring import score_label_ids
from common.model.loading import load_model
from common.text.prompts import classification_ids

LAYER = {8: "Linear8bitLt", 4: "Linear4bit"}


@pytest.fixture(scope="module")
def merged(trained_run, prepared_data, tmp_path_factory):
    """merge_lora.py on the trained run, once; its parent plays runs_dir for the default input."""
    out = tmp_path_factory.mktemp("runs") / "lora-merged"
    proc = run_script("merge_lora.py", "--adapter", str(trained_run), "--output", str(out),
                      "--set", f"data.processed_dir={prepared_data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def copies(merged, prepared_data):
    """bits -> (copy dir, stdout). 8-bit by the defaults (newest *-merged in runs_dir), NF4 by flags."""
    data = ["--set", f"data.processed_dir={prepared_data}"]
    int8 = run_script("quantize_model.py", "--set", f"train.runs_dir={merged.parent}", *data)
    assert int8.returncode == 0, int8.stderr[-3000:]
    nf4 = run_script("quantize_model.py", "--model", str(merged), "--bits", "4",
                     "--output", str(merged.parent / "nf4-copy"), *data)
    assert nf4.returncode == 0, nf4.stderr[-3000:]
    return {8: (merged.parent / "lora-merged-int8", int8.stdout), 4: (merged.parent / "nf4-copy", nf4.stdout)}


def test_help():
    proc = run_script("quantize_model.py", "--help")
    assert proc.returncode == 0 and "python quantize_model.py" in proc.stdout and "--bits" in proc.stdout


@pytest.mark.parametrize("bits", [8, 4])
def test_copy_loads_quantized_without_a_config_and_answers(bits, copies, merged, prepared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _ = copies[bits]
    assert check_model_dir(out) == []
    for name in ("labels.json", "calibration.json", "chat_template.jinja", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (merged / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}).eval()  # no quantization config
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.endswith("_proj") or name == "lm_head"}
    assert kinds == {LAYER[bits]}  # the output head too (quantize.lm_head: quantized)
    tokenizer = AutoTokenizer.from_pretrained(out)
    labels = json.loads((out / "labels.json").read_text())["labels"]
    record = json.loads((prepared_data / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompts = classification_ids(tokenizer, [record["text"]], labels, load_config(use_env=False).prompt)
    scores = score_label_ids(model, tokenizer, prompts, labels)
    assert torch.isfinite(scores.logprobs).all() and 0 <= scores.best()[0][0] < len(labels)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "quantize" and manifest["quantization"] == f"{bits}bit"


@pytest.mark.parametrize("bits", [8, 4])
def test_report_figures(bits, copies, prepared_data):
    _, stdout = copies[bits]
    n_test = len((prepared_data / "test.jsonl").read_text(encoding="utf-8").splitlines())
    m = re.search(r"label agreement with the 16-bit model on (\d+) items of test\.jsonl: ([\d.]+)", stdout)
    assert m and int(m[1]) == n_test and 0 <= float(m[2]) <= 1, stdout
    if bits == 8:  # LLM.int8 with the output head in 8-bit too picks the 16-bit model's labels (22/23 here,
        assert float(m[2]) >= 0.9, stdout  # on a 4-step model whose labels are near ties; the demo's: docs/quantize.md)
    delta = re.search(r"label probabilities moved by ([\d.]+) on average, ([\d.]+) at most", stdout)
    assert delta and 0 <= float(delta[1]) <= float(delta[2]) <= 1, stdout
    assert re.search(r"size on disk \(weights\): [\d.]+ MB vs [\d.]+ MB 16-bit", stdout)
    assert re.search(r"load time on cpu: [\d.]+s pre-quantized vs [\d.]+s quantizing", stdout)
    outliers = re.search(r"inputs to the 8-bit layers peaked at ([\d.]+); (\d+) of (\d+) layer calls had a column "
                         r"at or past 6.0", stdout)
    assert bool(outliers) == (bits == 8), stdout
    if outliers:
        assert float(outliers[1]) > 0 and int(outliers[3]) > 0 and int(outliers[2]) <= int(outliers[3])
        manifest = json.loads((copies[8][0] / "manifest.json").read_text())
        assert manifest["int8_outliers"]["layer_calls"] == int(outliers[3])


def test_the_outlier_watch_sees_the_columns_threshold_6_keeps_in_16_bits():
    """A real LLM.int8 layer fed one feature column at 40: the watch counts it, and the threshold matters
    exactly there (6.0 multiplies that column in 16 bits; 0.0 quantizes it with the rest, a larger error)."""
    import bitsandbytes as bnb

    from quantize_model import OutlierWatch
    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 64)
    x = torch.randn(4, 256)
    x[:, 7] = 40.0
    errors = {}
    for threshold in (0.0, 6.0):
        layer = bnb.nn.Linear8bitLt(256, 64, has_fp16_weights=False, threshold=threshold)
        layer.load_state_dict(plain.state_dict())
        model = torch.nn.Sequential(layer.to("cpu")).eval()
        watch = OutlierWatch(model)
        with torch.no_grad():
            errors[threshold] = float((model(x) - plain(x)).abs().max())
            model(torch.randn(4, 256).clamp(-3, 3))  # a call with no outlier
        found = watch.figures()
        assert found == {"largest_input": 40.0, "threshold": 6.0, "layer_calls": 2, "calls_with_outlier_columns": 1,
                         "most_outlier_columns": 1}, found
    assert errors[6.0] < errors[0.0] / 3, errors


def test_existing_output_and_quantized_input_are_refused(copies, merged):
    out, _ = copies[4]
    before = (out / "manifest.json").read_bytes()
    proc = run_script("quantize_model.py", "--model", str(merged), "--bits", "4", "--output", str(out))
    assert proc.returncode == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "manifest.json").read_bytes() == before
    proc = run_script("quantize_model.py", "--model", str(out), "--output", str(out.parent / "twice"))
    assert proc.returncode == 1 and "already quantized" in proc.stderr and not (out.parent / "twice").exists()


def test_bad_bits_is_one_sentence(merged):
    proc = run_script("quantize_model.py", "--model", str(merged), "--bits", "3")
    assert proc.returncode == 1 and "quantize.bits must be 8" in proc.stderr and "Traceback" not in proc.stderr


def test_the_shared_loader_keeps_the_copy_quantized(copies):
    """What serving and evaluation call: the int8 copy must come back as Linear8bitLt, not plain Linear."""
    out, _ = copies[8]
    model = load_model(out, device="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"


def test_int8_threshold_is_what_the_copy_is_made_with(merged, prepared_data, tmp_path):
    """model.int8_threshold reaches bitsandbytes: the copy's config (what loads it later) and manifest carry it."""
    out = tmp_path / "int8-t0"
    proc = run_script("quantize_model.py", "--model", str(merged), "--output", str(out),
                      "--set", "model.int8_threshold=0.0", "--set", f"data.processed_dir={prepared_data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["load_in_8bit"] and quant["llm_int8_threshold"] == 0.0
    assert json.loads((out / "manifest.json").read_text())["int8_threshold"] == 0.0
