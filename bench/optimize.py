"""TF-MOT variants of the `small` models against the dense model, with the issue's targets.

Starts from the runs bench/quality.py trains with the defaults (runs/bench-quality/{transformer,lstm}/defaults,
1,500 steps on the bundled Shakespeare), makes each variant through the real
`lmstack optimize` code path unless it exists (--rerun remakes them):

    pruned50       prune to 50 %, polynomial schedule, 300 steps
    pruned80       prune to 80 %, 300 steps
    qat            8-bit QAT on the Dense layers, 200 steps
    pruned50-qat   pruning-preserving QAT on pruned50, 200 steps
    cluster16      16 clusters per weight, 200 steps

then measures every model with `lmstack report`'s code (sizes, validation
perplexity and bits/char, ms per generated token) and checks the targets as
ratios against the dense model measured in the same run:
50 % sparsity with <= +5 % perplexity; gzip'd 50 %-pruned model <= 60 % of
the dense one; QAT within 2 % of the float model's perplexity.

Prints a table per model and writes bench/results/optimize.json.

usage: python bench/optimize.py [--models=transformer,lstm] [--rerun]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: F401  (environment before TensorFlow)
import tensorflow as tf

from pipelines import checkpoints, optimize, report
from pipelines.progress import Progress

RESULTS = ROOT / "bench" / "results"
RECIPES = {
    "pruned50": optimize.OptimizeConfig("prune", steps=300, target_sparsity=0.5),
    "pruned80": optimize.OptimizeConfig("prune", steps=300, target_sparsity=0.8),
    "qat": optimize.OptimizeConfig("qat", steps=200),
    "pruned50-qat": optimize.OptimizeConfig("prune_qat", steps=200, from_variant="pruned50"),
    "cluster16": optimize.OptimizeConfig("cluster", steps=200, clusters=16),
}


def targets(rows: dict[str, report.Row]) -> list[tuple[str, str, bool | None]]:
    dense = rows["dense"]

    def change(name):
        return rows[name].perplexity / dense.perplexity - 1 if name in rows else None

    out = []
    if "pruned50" in rows:
        out.append(("50 % sparsity: perplexity <= +5 %", f"{change('pruned50'):+.2%}", change("pruned50") <= 0.05))
        ratio = rows["pruned50"].gzip_bytes / dense.gzip_bytes
        out.append(("50 % pruned gzip'd size <= 60 % of dense", f"{ratio:.1%}", ratio <= 0.60))
    if "pruned80" in rows:
        out.append(("80 % sparsity: perplexity (reported)", f"{change('pruned80'):+.2%}", None))
    if "qat" in rows:
        out.append(("QAT: perplexity within 2 % of float", f"{change('qat'):+.2%}", abs(change("qat")) <= 0.02))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,lstm")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--rerun", action="store_true", help="remake variants that exist")
    args = parser.parse_args()
    progress = Progress(sys.stderr)
    machine = {"node": platform.node(), "cpus": len(tf.config.list_logical_devices("CPU"))}
    results = {"benchmark": "optimize", "machine": machine,
               "tensorflow": tf.__version__, "recipes": {k: dataclasses.asdict(v) for k, v in RECIPES.items()},
               "models": {}}
    for family in args.models.split(","):
        workdir = pathlib.Path(args.workdir) / family / "defaults"  # bench/quality.py's row of the defaults
        if not (workdir / "checkpoints").is_dir():
            sys.exit(f"{workdir} has no trained model: run `python bench/quality.py --rows={family}/defaults` first")
        have = checkpoints.variants(workdir)
        for name, recipe in RECIPES.items():
            if name not in have or args.rerun:
                optimize.optimize(workdir, dataclasses.replace(recipe, overwrite=True), progress, verbose=2)
        rows = {r.variant: r for r in report.collect(workdir, latency=True, progress=progress)}
        print(f"\n## {family} (small)\n")
        print(report.table(list(rows.values())))
        checks = targets(rows)
        print()
        for what, value, ok in checks:
            print(f"- {what}: {value} " + {True: "(met)", False: "(NOT met)", None: ""}[ok])
        results["models"][family] = {
            "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "weights"} for r in rows.values()],
            "targets": [{"target": w, "value": v, "met": ok} for w, v, ok in checks]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optimize.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'optimize.json'}")


if __name__ == "__main__":
    main()
