"""Fine-tune a pre-trained lmstack run into a text classifier (transfer learning).

Reads labelled examples from CSV or JSONL (also .gz / .bz2), builds a
classifier from the --base run's backbone (its tokenizer, architecture and
weights) with a pooling + Dense head, and trains it with the backbone frozen
(--freeze=all), partly frozen (--freeze=N: embeddings + the bottom N layers)
or fully fine-tuned (--freeze=none); --unfreeze_at=K trains frozen for K
steps, then everything at --unfreeze_learning_rate. --baseline also trains the
same network from scratch, so you see what pre-training buys. Writes a
classifier workdir: `lmstack evaluate` and `lmstack export` take it.

example:
  lmstack finetune --workdir=runs/reviews-cls --base=runs/shakespeare \\
      --train=data/reviews.csv.bz2 --text_column=text --label_column=label \\
      --freeze=none --steps=600 --baseline
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from pipelines import finetune

    flags.DEFINE_string("workdir", None, "the classifier workdir to create", flag_values=fv)
    settings.define(fv, finetune.FinetuneConfig)
    settings.define_progress(fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import finetune
    from pipelines.progress import Progress

    config = settings.build(fv, finetune.FinetuneConfig)
    summary = finetune.finetune(fv.workdir, config, progress=Progress(sys.stderr),
                                verbose=settings.keras_verbose(fv.progress))
    print(finetune.describe(summary), file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("path", "accuracy", "macro_f1", "examples", "trainable_params",
                                              "params") if k in summary}
                     | ({"baseline_accuracy": summary["baseline"]["accuracy"]} if "baseline" in summary else {})))
    return 0
