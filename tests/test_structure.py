"""The layout the code map in docs/README.md promises: stages over a shared floor in wings that import
downward only, short files, one entry point, and flask only where HTTP is."""
import ast
import subprocess
from pathlib import Path

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


# A module may import its own wing and the ones below it; the top of common/ imports no wing.
WING_RANK = {"text": 1, "model": 2, "evaluation": 3, "serving": 4}
FLASK_ALLOWED = ("common/serving/", "deploy_with_limits.py")


def python_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in tracked if (ROOT / f).is_file()]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (`from common.x import y` names the
    module common.x.y when y is one, else common.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                      for a in node.names}
    return found


def common_graph(files=None) -> dict[str, set[str]]:
    """common's import graph: module -> the common modules it imports (packages' __init__ left out)."""
    files = files or [p for p in python_files() if p.parts[len(ROOT.parts)] == "common"]
    return {module_name(p): {m for m in imports_of(p) if m.startswith("common.") and m.count(".") >= 1}
            for p in files if p.name != "__init__.py"}


def rank(module: str) -> int:
    parts = module.split(".")
    return WING_RANK.get(parts[1], 0) if len(parts) > 2 else 0


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {n}" for m, deps in graph.items() for n in deps
                  if rank(n) > rank(m) or (rank(n) == rank(m) > 0 and n.split(".")[1] != m.split(".")[1]))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, found by depth-first search (each reported once, from where it was entered)."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_every_common_import_names_a_module_that_exists():
    """No import of a moved or renamed module survives anywhere: stages, tests, common/ itself."""
    missing = sorted(f"{module_name(p)}: {m}" for p in python_files() for m in imports_of(p)
                     if m.startswith("common.") and not is_module(m) and not is_module(m.rpartition(".")[0]))
    assert not missing, missing


def test_the_wings_import_downward_only_and_nothing_imports_in_a_circle():
    graph = common_graph()
    assert len(graph) > 20 and any(m.startswith("common.serving.") for m in graph)
    assert not upward_imports(graph), upward_imports(graph)
    assert not cycles(graph), cycles(graph)


def test_the_rule_catches_an_upward_import_and_a_circle(tmp_path):
    """The checks above can fail: a model module that imports serving, and two modules importing each other."""
    graph = common_graph()
    graph["common.model.loading"] = graph["common.model.loading"] | {"common.serving.engine"}
    assert upward_imports(graph) == ["common.model.loading imports common.serving.engine"]
    graph["common.config"] = graph["common.config"] | {"common.text.prompts"}
    assert "common.config imports common.text.prompts" in upward_imports(graph)
    assert cycles(graph)  # serving.engine -> model.loading -> serving.engine


def test_flask_is_imported_only_where_http_is():
    """The HTTP layer is deploy_with_limits.py and common/serving/; everything below takes plain arguments."""
    outside = sorted(str(p.relative_to(ROOT)) for p in python_files()
                     if p.parts[len(ROOT.parts)] != "tests" and not str(p.relative_to(ROOT)).startswith(FLASK_ALLOWED)
                     and any(m.split(".")[0] in ("flask", "flask_limiter", "werkzeug") for m in imports_of(p)))
    assert not outside, outside


def test_only_deploy_reads_the_flask_request():
    """The request is passed in below deploy_with_limits.py, never read from flask's globals."""
    readers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "common").rglob("*.py")
                     if any(isinstance(n, ast.ImportFrom) and n.module == "flask"
                            and {a.name for a in n.names} & {"request", "g", "current_app"}
                            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))))
    assert not readers, readers


def test_no_two_modules_or_classes_share_a_name():
    """One meaning per name: no module stem twice under common/, no class name defined twice in the code."""
    stems = [p.stem for p in (ROOT / "common").rglob("*.py") if p.name != "__init__.py"]
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)
    classes = [n.name for p in python_files() if p.parts[len(ROOT.parts)] != "tests"
               for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)]
    assert len(classes) == len(set(classes)), sorted({c for c in classes if classes.count(c) > 1})


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
