"""The sample data: deterministic, big enough, held-out test items disjoint from the training CSV."""
import csv
import json
import subprocess
import sys
from collections import Counter

from conftest import ROOT


def test_generator_reproduces_the_committed_files(tmp_path):
    csv_out, test_out = tmp_path / "news.csv", tmp_path / "test.json"
    subprocess.run([sys.executable, str(ROOT / "data" / "make_sample_news.py"), "--out-csv", str(csv_out),
                    "--out-test", str(test_out)], check=True, capture_output=True, cwd=ROOT)
    assert csv_out.read_bytes() == (ROOT / "data" / "sample_news.csv").read_bytes()
    assert test_out.read_bytes() == (ROOT / "data" / "sample_test.json").read_bytes()


def test_size_balance_and_disjoint_test_items():
    with open(ROOT / "data" / "sample_news.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(r["label"] for r in rows)
    assert len(rows) >= 800 and len(counts) >= 6 and min(counts.values()) >= 100
    assert len({r["text"] for r in rows}) == len(rows)
    test_items = json.loads((ROOT / "data" / "sample_test.json").read_text(encoding="utf-8"))
    assert {t["label"] for t in test_items} == set(counts)
    assert not {t["text"] for t in test_items} & {r["text"] for r in rows}
