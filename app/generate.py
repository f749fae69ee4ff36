"""Continue a prompt with the workdir's newest model, streaming the text as it comes.

Loads WORKDIR's tokenizer and newest checkpoint, tokenizes --prompt, and
prints the continuation token by token. Stops at [EOS] or --max_new_tokens.
An empty prompt starts a new document. --backend=savedmodel runs the newest
export (WORKDIR/export/lm/N, or --export_dir) through TensorFlow's loader;
--backend=tflite runs WORKDIR/tflite/ (--quantize picks the file) in
ai-edge-litert. In float32, greedy text is the same token for token on all three.

example:
  lmstack generate --workdir=runs/shakespeare --prompt="ROMEO." --max_new_tokens=200 --sampler=top_k --seed=1
  lmstack generate --workdir=runs/shakespeare --prompt="ROMEO." --backend=tflite --quantize=int8
"""

from __future__ import annotations

import sys

from absl import flags

from app import settings


def define_flags(fv: flags.FlagValues) -> None:
    from serving.exporters import tflite

    flags.DEFINE_string("workdir", None, "a workdir with a trained model", flag_values=fv)
    settings.define_generation(fv)
    flags.DEFINE_string("variant", "", "an optimized variant (WORKDIR/optimized/NAME) instead of the trained model",
                        flag_values=fv)
    flags.DEFINE_enum("backend", "keras", ["keras", "savedmodel", "tflite"], "what runs the model",
                      flag_values=fv)
    flags.DEFINE_enum("quantize", "none", list(tflite.QUANTIZATIONS), "tflite: which file (none: float32)",
                      flag_values=fv)
    flags.DEFINE_string("export_dir", "", "savedmodel: an export version directory (default: the newest "
                        "WORKDIR/export/lm/N)", flag_values=fv)
    flags.DEFINE_integer("num_threads", 0, "tflite: interpreter threads (0: the runtime's default)", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines.generate import TextGenerator

    sampler = settings.sampler(fv)
    if fv.backend == "keras":
        generator = TextGenerator(fv.workdir, fv.variant)
        for piece in generator.stream(fv.prompt, fv.max_new_tokens, sampler):
            sys.stdout.write(piece)
            sys.stdout.flush()
    else:
        from serving.exporters import backends

        sys.stdout.write(backends.generate(fv.backend, fv.workdir, fv.prompt, fv.max_new_tokens, sampler,
                                           variant=fv.variant, quantize=fv.quantize, export_dir=fv.export_dir,
                                           num_threads=fv.num_threads or None))
    sys.stdout.write("\n")
    return 0
