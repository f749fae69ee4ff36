"""Import a pre-trained GPT-2 into a new workdir that every later stage accepts.

--checkpoint is a keras-hub GPT-2 preset directory (what `save_to_preset`
writes, or a downloaded Kaggle preset) or a Hugging Face GPT-2 directory
(config.json, model.safetensors, vocab.json, merges.txt). The weights go into
lmstack's tf_keras GPT, so `optimize` (TF-MOT), `export`, `serve` and `tflite`
take it as they take a model trained here; the tokenizer is GPT-2's byte-level
BPE. Nothing is downloaded. Then `lmstack prepare --workdir=... --corpus=...`
tokenizes your text with that tokenizer, for `train` (continued pre-training),
`finetune`, `evaluate` and int8 calibration.

example:
  lmstack import --checkpoint=~/models/gpt2 --workdir=runs/gpt2
  lmstack generate --workdir=runs/gpt2 --prompt="The meaning of life is"
"""

from __future__ import annotations

import json
import sys

from absl import flags



def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "a keras-hub GPT-2 preset or a Hugging Face GPT-2 directory",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "the new workdir (must not exist, or be empty)", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    import os

    from pipelines import pretrained
    from pipelines.progress import Progress

    section = pretrained.import_checkpoint(os.path.expanduser(fv.checkpoint), fv.workdir, Progress(sys.stderr))
    print(json.dumps({"workdir": fv.workdir, **section}))
    return 0
