"""predict.py on the tiny model through the real code: every row back once and in order (GBK CSV, xlsx),
a SIGKILLed run resumed to the same bytes, the service's /v1/classify, two processes, calibration, errors."""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script
from serving import free_port, start_server

from common.evaluation.calibration import write_calibration

# one OpenMP thread a process: on a shared 2-core box two spin against other jobs (docs/BENCHMARKS.md)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CHUNK = ["--chunk-rows", "16", "--batch-size", "8", "--max-tokens", "220"]
LONG = "央行宣布下调存款准备金率，释放长期流动性，市场预期稳定。" * 40   # far over --max-tokens 220


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    """The trained run's files (not its checkpoints) in a copy without calibration.json: T = 1, the raw scores
    the service gives too."""
    out = tmp_path_factory.mktemp("predict") / "run"
    out.mkdir()
    for p in trained_run.iterdir():
        if p.is_file() and p.name != "calibration.json":
            shutil.copy2(p, out / p.name)
    return out


@pytest.fixture(scope="module")
def backlog(prepared_data, tmp_path_factory):
    """A GBK CSV of ~200 rows (and the same rows as an .xlsx): blank texts, duplicates, an over-long text, a
    malformed row, a number as text. Returns (csv path, xlsx path, the expected status per row id)."""
    d = tmp_path_factory.mktemp("backlog")
    texts = [json.loads(line)["text"] for split in ("test", "val", "train")
             for line in (prepared_data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()][:180]
    rows, expect = [], {}
    for i, text in enumerate(texts):
        special = {10: "", 20: "   ", 30: LONG, 40: texts[5], 41: texts[5], 50: "12345"}
        text = special.get(i, text)
        rows.append([f"r{i}", text, f"来源{i % 3}"])
        expect[f"r{i}"] = "empty text" if not text.strip() else "truncated" if text == LONG else "ok"
    lines = io.StringIO()
    w = csv.writer(lines)
    w.writerow(["编号", "内容", "来源"])
    for i, row in enumerate(rows):
        w.writerow(row + (["多余的一列"] if i == 60 else []))  # a row the reader rejects: 4 fields, header has 3
    expect["r60"] = "row has 4 fields, the header has 3"
    (d / "backlog.csv").write_bytes(lines.getvalue().encode("gbk"))
    import openpyxl
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["编号", "内容", "来源"])
    for i, row in enumerate(rows):
        ws.append([row[0], 12345 if i == 50 else row[1] or None, row[2]])
    wb.save(d / "backlog.xlsx")
    return d / "backlog.csv", d / "backlog.xlsx", expect


def read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def predict(*args):
    return run_script("predict.py", *args, env=ONE_THREAD)


@pytest.fixture(scope="module")
def local_csv(backlog, run_dir):
    """The uninterrupted single-process run on the GBK CSV, default output path."""
    proc = predict("--input", str(backlog[0]), "--model", str(run_dir), *CHUNK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return backlog[0].with_name("backlog.predicted.csv"), proc.stdout


def test_every_row_back_in_order_with_its_columns_and_status(backlog, local_csv):
    out, stdout = local_csv
    rows, expect = read_csv(out), backlog[2]
    assert [r["编号"] for r in rows] == list(expect)  # every row once, in input order
    assert list(rows[0])[:3] == ["编号", "内容", "来源"] and rows[7]["来源"] == "来源1"
    for r in rows:
        assert r["status"] == expect[r["编号"]], r
        scored = r["status"] in ("ok", "truncated")
        assert bool(r["label"]) == scored and bool(r["runner_up"]) == scored
        if scored:
            assert float(r["probability"]) >= float(r["runner_up_probability"])
            assert r["review"] == ("true" if float(r["probability"]) < 0.8 else "false")
        else:
            assert r["review"] == "true"
    assert rows[50]["内容"] == "12345" and rows[50]["status"] == "ok"
    assert rows[40]["label"] == rows[41]["label"] and rows[40]["probability"] == rows[41]["probability"]
    assert "rows 180, labelled 177 (truncated 1)" in stdout and "not scored 3" in stdout, stdout
    assert "items/s" in stdout and "training" in stdout and "train.jsonl" in stdout, stdout


def test_xlsx_in_xlsx_out_with_a_calibrated_run(backlog, run_dir, local_csv, tmp_path):
    """The same rows from an .xlsx, through a run whose calibration.json says T = 2: the same labels, each
    less sure, and --target-accuracy picks its threshold from the coverage curve."""
    import openpyxl
    calibrated = tmp_path / "calibrated"
    shutil.copytree(run_dir, calibrated)
    write_calibration(calibrated, 2.0, coverage=[{"threshold": 0.2, "coverage": 0.9, "accuracy": 0.6},
                                                 {"threshold": 0.3, "coverage": 0.4, "accuracy": 0.96}])
    out = tmp_path / "labelled.xlsx"
    proc = predict("--input", str(backlog[1]), "--model", str(calibrated), "--output", str(out),
                   "--target-accuracy", "0.95", *CHUNK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "review threshold 0.3" in proc.stdout, proc.stdout
    ws = openpyxl.load_workbook(out, read_only=True).active
    head, *rows = [list(r) for r in ws.iter_rows(values_only=True)]
    assert head == ["编号", "内容", "来源", *("label probability runner_up runner_up_probability review status".split())]
    by_id, plain = {r[0]: dict(zip(head, r)) for r in rows}, {r["编号"]: r for r in read_csv(local_csv[0])}
    assert list(by_id) == list(plain) and by_id["r50"]["内容"] == 12345
    for key, r in by_id.items():
        p = plain[key]
        if key == "r60":  # the CSV's malformed row is a plain row in the workbook
            assert r["status"] == "ok"
            continue
        if r["label"] is None:
            assert r["status"] == "empty text" == p["status"]
            continue
        assert r["label"] == p["label"] and r["probability"] <= float(p["probability"]) + 1e-4
        assert r["review"] == (r["probability"] < 0.3)
    far = predict("--input", str(backlog[1]), "--model", str(calibrated), "--output", str(tmp_path / "x.csv"),
                  "--target-accuracy", "0.99", *CHUNK)
    assert far.returncode == 1 and "no threshold reaches accuracy 0.99" in far.stderr, far.stderr


def wait_for(predicate, proc, deadline_s: float = 300):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "predict.py finished before the event"
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def kill_after_first_chunk(args: list[str], partial) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(partial.glob("chunk-*.jsonl")), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_then_resume_gives_the_same_bytes(backlog, run_dir, local_csv, tmp_path):
    src = tmp_path / "backlog.csv"
    shutil.copy(backlog[0], src)
    out, partial = tmp_path / "resumed.csv", tmp_path / "resumed.csv.partial"
    args = ["--input", str(src), "--model", str(run_dir), "--output", str(out), *CHUNK]
    kill_after_first_chunk(args, partial)
    assert not out.exists(), "killed after it had finished: nothing was resumed"
    done = sorted(p.name for p in partial.glob("chunk-*.jsonl"))
    assert done and len(done) < 12
    saved = tmp_path / "saved-partial"
    shutil.copytree(partial, saved)
    proc = predict(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"continuing from {partial}: {len(done)} chunk(s) already done" in proc.stdout, proc.stdout
    assert out.read_bytes() == local_csv[0].read_bytes()
    assert not partial.exists()
    # the saved progress of the old input, and the input changed: it starts over, and says so
    shutil.copytree(saved, tmp_path / "changed.csv.partial")
    src.write_bytes(src.read_bytes() + "r999,新的一行：股市今日上涨,来源9\r\n".encode("gbk"))
    again = predict("--input", str(src), "--model", str(run_dir), "--output", str(tmp_path / "changed.csv"), *CHUNK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the input changed since" in again.stdout and "starting over" in again.stdout, again.stdout
    rows = read_csv(tmp_path / "changed.csv")
    assert len(rows) == 181 and rows[-1]["编号"] == "r999" and rows[-1]["status"] == "ok"


def test_url_mode_gives_the_local_labels(backlog, run_dir, tiny_model, local_csv, tmp_path):
    """Through the real gunicorn service (base + the run's adapter), a rate limit low enough that some
    calls get 429 and are retried after Retry-After: the same labels, the same probabilities."""
    server = start_server(tiny_model, tmp_path / "logs", ADAPTER_PATH=str(run_dir), RATE_LIMITS="3/second",
                          **ONE_THREAD)
    try:
        out = tmp_path / "via-service.csv"
        proc = predict("--input", str(backlog[0]), "--url", server.url, "--model", str(run_dir),
                       "--output", str(out), *CHUNK)
        assert proc.returncode == 0, proc.stderr[-3000:]
        statuses = [r.get("status") for r in server.records() if "classify" in str(r.get("endpoint"))]
    finally:
        server.stop()
    assert 429 in statuses and 200 in statuses, statuses  # the retry path ran
    here, there = read_csv(local_csv[0]), read_csv(out)
    assert [r["编号"] for r in there] == [r["编号"] for r in here]
    for a, b in zip(here, there):
        assert (a["label"], a["status"], a["runner_up"]) == (b["label"], b["status"], b["runner_up"]), (a, b)
        if a["label"]:
            assert abs(float(a["probability"]) - float(b["probability"])) < 2e-3, (a, b)


def test_two_processes_write_what_one_does(backlog, run_dir, local_csv, tmp_path):
    """accelerate launch (torchrun underneath) with 2 CPU processes: chunks alternate between them, rank 0
    writes the file. --multi_gpu is what starts several processes; accelerate's --cpu would start one."""
    out = tmp_path / "two.csv"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "predict.py"), "--input", str(backlog[0]), "--model", str(run_dir), "--output", str(out), *CHUNK]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in process 0 of 2" in proc.stdout, proc.stdout
    assert out.read_bytes() == local_csv[0].read_bytes()


def test_errors_are_one_sentence(backlog, local_csv, tmp_path, capsys):
    """Each is found before a model loads: one line on stderr, exit 1 (in process: the same main())."""
    import predict as stage
    cases = [(["--input", str(tmp_path / "nope.csv")], "not found"),
             (["--input", str(backlog[0]), "--output", str(tmp_path / "a.csv"), "--text-col", "正文"],
              "text column '正文' not found; the file has columns: 编号, 内容, 来源"),
             (["--input", str(backlog[0])], "exists; pass --force"),
             (["--input", str(backlog[0]), "--output", str(tmp_path / "a.parquet")], "name the output .csv")]
    for args, message in cases:
        assert stage.main(args) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
