"""Joins the tables every benchmark printed (bench/results/NAME.md) into bench/results/SUMMARY.md.

`make bench` runs each benchmark with its output copied to bench/results/NAME.md
(next to the NAME.json it writes), then this script, so one page holds the
latest figures with the machine and the date they came from.

usage: python bench/summary.py NAME [NAME ...]   (in the order to show them)
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# Benchmarks that start from the models bench/quality.py trains with the defaults.
STARTS_FROM_QUALITY = ("optimize", "edge")

def main() -> None:
    names = sys.argv[1:] or sorted(p.stem for p in RESULTS.glob("*.md") if p.stem != "SUMMARY")
    try:
        import tensorflow as tf
        tf_version = tf.__version__
    except ImportError:
        tf_version = "not installed"
    lines = ["# lmstack benchmarks", "",
             f"Page written {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()} ({platform.platform()}, "
             f"{os.cpu_count()} CPUs), Python {platform.python_version()}, TensorFlow {tf_version}. "
             "Each section is the last output of one `bench/` script, with its JSON next to it; the scripts "
             "ran at different times (docs/results.md dates each).", ""]
    for name in names:
        path = RESULTS / f"{name}.md"
        if not path.is_file():
            first = ("`python bench/quality.py --rows=transformer/defaults,lstm/defaults --reuse` (the models it "
                     "starts from), then " if name in STARTS_FROM_QUALITY else "")
            lines += [f"## {name}", "", f"(no output: run {first}`python bench/{name}.py`)", ""]
            continue
        lines += [f"## {name} (`python bench/{name}.py`)", "", "```", path.read_text(encoding="utf-8").rstrip(),
                  "```", ""]
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
