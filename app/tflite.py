"""Convert the workdir's model (or a variant) to TFLite for on-device generation.

Writes WORKDIR/tflite/NAME.tflite (NAME = family[-variant]-quantization, e.g.
transformer-int8), a NAME.json sidecar with the model, tokenizer and signature
shapes, and the tokenizer files in WORKDIR/tflite/tokenizer/. The transformer
gets `prefill` and `decode` signatures (KV cache), the LSTM `sequence` (fused
sequence-LSTM kernel) and `step` (state); only TFLite built-in ops, so the
file runs in ai-edge-litert.

example:
  lmstack tflite --workdir=runs/shakespeare --quantize=int8
  lmstack tflite --workdir=runs/shakespeare --variant=pruned50 --quantize=dynamic --max_seq_len=64
"""

from __future__ import annotations

import sys

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    flags.DEFINE_string("variant", "", "an optimized variant (WORKDIR/optimized/NAME) instead of the trained model",
                        flag_values=fv)
    flags.DEFINE_string("quantize", "none", "none (float32) | float16 | dynamic | int8", flag_values=fv)
    flags.DEFINE_integer("max_seq_len", 0, "fixed sequence length / cache size (0: the model's context)",
                         flag_values=fv)
    flags.DEFINE_integer("calibration_windows", 32, "int8: validation windows that calibrate the ranges",
                         flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines.progress import Progress
    from serving.exporters import tflite

    config = tflite.TFLiteConfig(variant=fv.variant, quantize=fv.quantize, max_seq_len=fv.max_seq_len,
                                 calibration_windows=fv.calibration_windows)
    path = tflite.convert(fv.workdir, config, Progress(sys.stderr))
    print(tflite.describe(path), file=sys.stderr)
    print(path)
    return 0
