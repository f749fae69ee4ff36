"""Export the workdir's newest model as a SavedModel that TensorFlow Serving serves.

Writes EXPORT_BASE/VERSION/ (TensorFlow Serving's layout; the next free
integer version unless --version is given) with four signatures:
serving_default (greedy), generate (sampled, seeded), score and
next_token_logits; text in and text out, the tokenizer inside the graph.
A version appears complete or not at all.

example:
  lmstack export --workdir=runs/shakespeare
  lmstack export --workdir=runs/shakespeare --variant=pruned --export_base=/models/lm --version=7
"""

from __future__ import annotations

import sys

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    flags.DEFINE_string("variant", "", "an optimized variant (WORKDIR/optimized/NAME) instead of the trained model",
                        flag_values=fv)
    flags.DEFINE_string("export_base", "", "TensorFlow Serving's model base path (default WORKDIR/export/MODEL_NAME)",
                        flag_values=fv)
    flags.DEFINE_integer("version", 0, "version directory to write (default: the next free integer)",
                         flag_values=fv)
    flags.DEFINE_string("model_name", "lm", "the model's name in requests (warm-up records, default base path)",
                        flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from serving.exporters import savedmodel

    config = savedmodel.ExportConfig(variant=fv.variant, export_base=fv.export_base, version=fv.version,
                                 model_name=fv.model_name)
    path = savedmodel.export(fv.workdir, config)
    print(savedmodel.describe(path), file=sys.stderr)
    print(path)
    return 0
