"""Validation loss, perplexity and bits per character of the workdir's newest model.

A language-model run: scores the workdir's validation split, or --corpus (tokenized with the run's
tokenizer). Prints one JSON object (loss, perplexity, bits_per_char, tokens,
chars) on stdout and writes WORKDIR/metrics.json. Bits per character are total
nats / characters / ln 2, so runs with different tokenizers compare.
--variant scores an optimized variant; --backend=tflite scores a converted
TFLite file in ai-edge-litert, so a quantization's cost is measured.

A classifier workdir (`lmstack finetune`): accuracy, per-class precision,
recall and F1 and the confusion matrix on its validation split or on --corpus
(labelled files with the columns it was trained on); one JSON object on stdout
with an `accuracy` key, also in WORKDIR/metrics.json (under `evaluation`).

example:
  lmstack evaluate --workdir=runs/shakespeare --corpus=other_play.txt
  lmstack evaluate --workdir=runs/reviews-cls --corpus=more_reviews.csv
  lmstack evaluate --workdir=runs/shakespeare --backend=tflite --quantize=int8
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from pipelines.evaluate import EvaluateConfig
    from serving.exporters import tflite

    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    settings.define(fv, EvaluateConfig)
    flags.DEFINE_enum("backend", "keras", ["keras", "tflite"], "keras: the checkpoint; tflite: the converted "
                      "file in WORKDIR/tflite/ run by ai-edge-litert", flag_values=fv)
    flags.DEFINE_enum("quantize", "none", list(tflite.QUANTIZATIONS), "tflite: which file (none: float32)",
                      flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import checkpoints, evaluate
    from pipelines.progress import Progress

    if checkpoints.classifier_section(fv.workdir) is not None:
        return _evaluate_classifier(fv)
    if fv.backend == "tflite":
        from serving import edge
        from serving.exporters import tflite

        model = edge.EdgeModel(tflite.find(fv.workdir, fv.variant, fv.quantize))
        result = evaluate.evaluate_logits(fv.workdir, model.window_logits, model.max_seq_len, corpus=fv.corpus,
                                          progress=Progress(sys.stderr))
        result["backend"] = f"tflite ({model.path.rsplit('/', 1)[-1]})"
    else:
        result = evaluate.evaluate(fv.workdir, corpus=fv.corpus, variant=fv.variant, progress=Progress(sys.stderr))
    print(json.dumps(result))
    return 0


def _evaluate_classifier(fv: flags.FlagValues) -> int:
    from pipelines import evaluate
    from pipelines.errors import UserError
    from pipelines.progress import Progress

    if fv.variant or fv.backend != "keras":
        raise UserError(f"{fv.workdir} is a classifier workdir: --variant and --backend=tflite are for "
                        "language models; drop them")
    result = evaluate.evaluate_classifier(fv.workdir, corpus=fv.corpus, progress=Progress(sys.stderr))
    print(evaluate.describe_classifier(result), file=sys.stderr)
    print(json.dumps(result))
    return 0
