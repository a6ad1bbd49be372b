"""The layout the code map in docs/README.md promises: stages over a shared floor, short files, one entry point."""
import ast
import subprocess

import pytest
from conftest import ROOT

STAGES = sorted(p.stem for p in ROOT.glob("*.py") if p.name != "gunicorn.conf.py")


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage):
    others = imported_modules(ROOT / f"{stage}.py") & (set(STAGES) - {stage})
    assert not others, f"{stage}.py imports the stage(s) {sorted(others)}: move what they share into common/"


def test_no_source_file_over_400_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=ROOT, capture_output=True, text=True).stdout
    long = {f: n for f in tracked.split() if (n := len((ROOT / f).read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"over 400 lines: {long}"


def test_every_stage_has_an_importable_run_and_one_entry_point():
    for stage in ("verify_setup", "download_model", "prepare_data", "train_qwen", "evaluate_model", "merge_lora",
                  "quantize_model", "convert_checkpoint", "deploy_with_limits"):
        source = (ROOT / f"{stage}.py").read_text(encoding="utf-8")
        tree = ast.parse(source)
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"run", "main"} <= functions, stage
        assert "run_stage(" in source and not any(isinstance(n, ast.Global) for n in ast.walk(tree)), stage


def test_prepare_data_runs_from_python(tiny_model, tmp_path):
    """A stage's run(cfg) is callable without the command line: the same report the CLI prints."""
    import prepare_data
    from common.config import load_config
    cfg = load_config(use_env=False, overrides={"model.path": str(tiny_model),
                                                "data.processed_dir": str(tmp_path / "processed")})
    report = prepare_data.run(cfg)
    assert report["counts"]["kept"] > 0 and (tmp_path / "processed" / "train.jsonl").is_file()
