"""Export the workdir's newest model as a SavedModel that TensorFlow Serving serves.

Writes EXPORT_BASE/VERSION/ (TensorFlow Serving's layout; the next free
integer version unless --version is given) with the signatures of
`serving.contract`: serving_default (greedy), generate (sampled, seeded),
score, next_token_logits and generate_chunk (streams), and XLA-compiled
serving_default_xla, generate_xla and generate_chunk_xla; text in and text
out, the tokenizer inside the graph.
A version appears complete or not at all.

example:
  lmstack export --workdir=runs/shakespeare
  lmstack export --workdir=runs/shakespeare --variant=pruned --export_base=/models/lm --version=7
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from serving.exporters import savedmodel

    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    settings.define(fv, savedmodel.ExportConfig)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from serving.exporters import savedmodel

    path = savedmodel.export(fv.workdir, settings.build(fv, savedmodel.ExportConfig))
    print(savedmodel.describe(path), file=sys.stderr)
    print(json.dumps({"path": str(path), "model_name": fv.model_name, "version": int(path.name)}))
    return 0
