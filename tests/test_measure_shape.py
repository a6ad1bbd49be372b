"""measure_shape.py at the tiny shape, end to end on the CPU, so the GPU harness cannot rot: it builds the
random-weight model (in a child process), serves it as LLM.int8 at outlier thresholds 6.0 and 0.0 and as
NF4 through start_production.sh, measures admission, first token, decode alone and 3 at once, label
scoring against generating the label (benchmark.py), the bare model.generate loaded the same way
(benchmark.py --bare), trains QLoRA with train_qwen.py, and writes its figures beside the estimates."""
import json

import pytest
from conftest import run_script

ARGS = ("--shape", "tiny", "--prompt-tokens", "64", "--new-tokens", "48", "--decode-tokens", "8", "--train-steps", "2")


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory):
    """One random-weight tiny shape for the module: the first run builds it, the next reuse it."""
    return tmp_path_factory.mktemp("shape") / "tiny"


def test_the_harness_runs_at_the_tiny_shape(tmp_path, shape_dir):
    out = tmp_path / "out"
    proc = run_script("measure_shape.py", *ARGS, "--shape-dir", str(shape_dir), "--output-dir", str(out),
                      timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "measure-tiny.json").read_text())
    for variant, quant, threshold in (("8bit@6", "8bit", 6.0), ("8bit@0", "8bit", 0.0), ("4bit", "4bit", None)):
        s = result["serve"][variant]
        assert s["placement"]["quantization"] == quant and s["placement"]["int8_threshold"] == threshold, s
        assert s["admission"]["admitted_at_once"] == 3 and s["admission"]["refused"] == [], s["admission"]
        assert s["idle_after_cancel"] is True  # the cancelled generations left their slots
        assert s["ttft_s"] > 0 and s["decode_tokens_per_s_1"] > 0 and s["decode_tokens_per_s_3"] > 0
        assert s["errors_of_3"] == [] and s["kv_budget_tokens"] >= 3 * (64 + 48)
        ways = s["classify"]
        assert set(ways) == {"generating the label (chat, greedy)", "label scoring, 1 text a call",
                             "label scoring, 32 texts a call"}, ways
        assert all(w["items"] == 32 and w["items_per_s"] > 0 for w in ways.values())
        bare = s["bare"]
        assert bare["decode_tokens_per_s"] > 0 and bare["placement"]["quantization"] == quant, bare
        assert s["memory"]["rss_gib"] > 0
        assert result["estimates"][f"serve_{quant}"]["weights_gib"] > 0
    train = result["train"]
    assert train["steps"] == 2 and train["method"] == "qlora" and train["tokens_per_second"] > 0
    assert result["merge"]["device"] == "cpu" and "machine" in result
    table = (out / "measure-tiny.md").read_text()
    for row in ("| serve 8bit@0 | time to first token, 64-token prompt |", "| serve 4bit | bare model.generate",
                "| serve 8bit@6 | /v1/classify items/s", "| train qlora |"):
        assert row in table, table


def test_the_deadline_skips_what_cannot_finish_and_keeps_the_file_valid(tmp_path, shape_dir):
    """--deadline-s: a variant or part that cannot finish is recorded as skipped, not started."""
    out = tmp_path / "out"
    proc = run_script("measure_shape.py", *ARGS, "--shape-dir", str(shape_dir), "--output-dir", str(out),
                      "--deadline-s", "1", "--only", "serve", "--only", "train", "--quant", "4bit", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "measure-tiny.json").read_text())
    assert result["serve"] == {"4bit": {"skipped": "the deadline"}} and result["train"] == {"skipped": "the deadline"}
    assert "| serve 4bit | not measured: the deadline |" in (out / "measure-tiny.md").read_text()


def test_a_bad_variant_is_one_sentence_before_any_work(tmp_path):
    proc = run_script("measure_shape.py", "--shape", "tiny", "--quant", "8bit@x", "--shape-dir", str(tmp_path / "s"),
                      "--output-dir", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0 and "--quant takes 8bit, 8bit@<outlier threshold> or 4bit, got '8bit@x'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()
