"""Compare the trained model with its optimized variants (and TFLite files) on one page.

Measures each model of WORKDIR: non-zero parameters, SavedModel size raw and
gzip'd, TFLite size, validation perplexity and bits/char, CPU latency per
generated token. Writes WORKDIR/report/report.md with PNG plots (size against
quality, loss curves) and report.json; prints the table.

example:
  lmstack report --workdir=runs/shakespeare
"""

from __future__ import annotations

import json
import sys

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    flags.DEFINE_boolean("latency", True, "measure ms per generated token (a few seconds per model)",
                         flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import report
    from pipelines.progress import Progress
    from serving.exporters import tflite

    path = report.write(fv.workdir, latency=fv.latency, progress=Progress(sys.stderr),
                        tflite_measure=tflite.measure)
    text = path.read_text(encoding="utf-8")
    print(next(block for block in text.split("\n\n") if block.startswith("| variant")), file=sys.stderr)
    print(f"report: {path}", file=sys.stderr)
    print(json.dumps({"path": str(path), "rows": json.loads((path.parent / "report.json").read_text())}))
    return 0
