"""Convert the workdir's model (or a variant) to TFLite for on-device generation.

Writes WORKDIR/tflite/NAME.tflite (NAME = family[-variant]-quantization[-batchN],
e.g. transformer-int8) with TFLite Metadata and the tokenizer inside (an app
ships the file alone), a NAME.json sidecar with the model, tokenizer and
signature shapes, and the tokenizer files in WORKDIR/tflite/tokenizer/. The
transformer gets LiteRT-LM's signatures (`prefill_N` per --prefill_lengths and
the whole context, `decode`, a KV cache per layer and kind), the LSTM
`sequence` (a window, its steps in a loop) and `step` (state); a classifier
workdir (from `lmstack finetune`) gets `classify` (token ids -> class scores).
--batch_size sets the rows per call (a language model's rows decode in
lockstep: N samples of a prompt, or N prompts). Only TFLite built-in ops, so the file runs
in ai-edge-litert. --format=litertlm also writes WORKDIR/tflite/NAME.litertlm, the same
file with its tokenizer and LlmMetadata for Google's LiteRT-LM engine (Android, iOS,
desktop; transformers only).

example:
  lmstack tflite --workdir=runs/shakespeare --quantize=int8
  lmstack tflite --workdir=runs/shakespeare --variant=pruned50 --quantize=dynamic --max_seq_len=64
  lmstack tflite --workdir=runs/shakespeare --quantize=int8 --batch_size=4
  lmstack tflite --workdir=runs/shakespeare --quantize=int8 --format=litertlm
  lmstack tflite --workdir=runs/reviews --quantize=int8 --batch_size=8
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from serving.exporters import tflite

    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    settings.define(fv, tflite.TFLiteConfig)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines.progress import Progress
    from serving.exporters import tflite

    path = tflite.convert(fv.workdir, settings.build(fv, tflite.TFLiteConfig), Progress(sys.stderr))
    print(tflite.describe(path), file=sys.stderr)
    print(json.dumps({"path": str(path), "bytes": path.stat().st_size}))
    return 0
