"""measure_shape.py at the tiny shape, end to end on the CPU, so the GPU harness cannot rot: it builds the
random-weight model, serves it in 8-bit and 4-bit through start_production.sh, trains QLoRA with
train_qwen.py and decides where a merge would run, and writes its figures beside the estimates."""
import json

from conftest import run_script


def test_the_harness_runs_at_the_tiny_shape(tmp_path):
    out = tmp_path / "out"
    proc = run_script("measure_shape.py", "--shape", "tiny", "--shape-dir", str(tmp_path / "shape"),
                      "--output-dir", str(out), "--prompt-tokens", "64", "--new-tokens", "8",
                      "--burst-new-tokens", "4", "--train-steps", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "measure-tiny.json").read_text())
    for quant in ("8bit", "4bit"):
        s = result["serve"][quant]
        assert s["ttft_s"] > 0 and s["decode_tokens_per_s_1"] > 0 and s["decode_tokens_per_s_3"] > 0
        assert s["burst_13"] == {"200": 13} and s["classify_items_per_s"] > 0
        assert result["estimates"][f"serve_{quant}"]["weights_gib"] > 0
    train = result["train"]
    assert train["steps"] == 2 and train["method"] == "qlora" and train["tokens_per_second"] > 0
    assert result["merge"]["device"] == "cpu" and "machine" in result
    table = (out / "measure-tiny.md").read_text()
    assert "| serve 8bit | time to first token |" in table and "| train qlora |" in table
