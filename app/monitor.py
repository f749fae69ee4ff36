"""Compare what a served model is sent (its request logs) with what it was trained on.

Reads the PredictionLog TFRecords `lmstack serve` writes for a model with a
`logging_config` (PREFIX-*.tfrecord, local or on any TensorFlow filesystem),
cuts them into windows of --window, and measures each window's prompts
against WORKDIR: Jensen-Shannon divergence of their tokens from the training
split's (above what same-sized validation text gives), the [UNK] rate, the
model's perplexity on them over its perplexity on validation text of the same
lengths, and prompt and completion lengths. Prints a table, writes
WORKDIR/monitor/monitor.json and monitor.png, and exits 1 when a window
crosses a threshold (2 stays bad input), so a cron job or CI step can alert.

example:
  lmstack monitor --logs=/logs/lm --workdir=runs/shakespeare --window=1h --since=1d
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from pipelines.monitor import Thresholds

    flags.DEFINE_string("logs", None, "the logging_config's filename_prefix (its files are PREFIX-*.tfrecord)",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "the workdir of the served model (its tokenizer, data and model)",
                        flag_values=fv)
    flags.DEFINE_string("window", "1h", "time per window: 90s, 30m, 1h, 1d", flag_values=fv)
    flags.DEFINE_string("since", "", "only requests of this last stretch of time (e.g. 1d); empty: all",
                        flag_values=fv)
    flags.DEFINE_string("model", "", "only requests for this model name; empty: all", flag_values=fv)
    settings.define(fv, Thresholds)
    flags.mark_flags_as_required(["logs", "workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import monitor
    from pipelines.progress import Progress

    since = monitor.parse_duration(fv.since, "since") if fv.since else 0
    result = monitor.monitor(fv.logs, fv.workdir, window=monitor.parse_duration(fv.window),
                             thresholds=settings.build(fv, monitor.Thresholds), model=fv.model, since=since,
                             progress=Progress(sys.stderr))
    print(monitor.table(result["windows"]), file=sys.stderr)
    drifted = [w for w in result["windows"] if w["drift"]]
    print(f"{len(drifted)} of {len(result['windows'])} windows drifted" if drifted else "no drift",
          f"(plot: {result['plots'][0]})", file=sys.stderr)
    print(json.dumps({"drift": result["drift"], "windows": len(result["windows"]),
                      "drifted": [w["window_start"] for w in drifted]}))
    return 1 if result["drift"] else 0
