"""Read a text corpus, learn a tokenizer and write train/val token shards.

Reads UTF-8 text files, globs and .gz files; holds out contiguous blocks of
lines for validation; learns the tokenizer on the training text; writes
WORKDIR/tokenizer/, WORKDIR/data/ (GZIP TFRecord shards + manifest.json) and
WORKDIR/config.json. Rerunning with the same inputs reuses the workdir.
On a workdir made by `lmstack import`, tokenizes with the imported model's
tokenizer and writes data/ only.

With --runner, tokenizing and writing the shards run as an Apache Beam
pipeline (pip install 'lmstack[beam]'), with the same result: DirectRunner
in this process; DataflowRunner, FlinkRunner or SparkRunner with their own
options in --beam_options and a gs:// (or other shared) workdir and corpus.

example:
  lmstack prepare --corpus=data/shakespeare.txt.gz --workdir=runs/shakespeare --tokenizer=char
  lmstack prepare --corpus='gs://b/corpus/*.txt' --workdir=gs://b/runs/x --runner=DataflowRunner \
      --beam_options="--project=P --region=europe-west4 --temp_location=gs://b/tmp --setup_file=./setup.py"
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import flags

from app import settings

TOKENIZER = {"kind": "tokenizer"}  # TokenizerConfig.kind is --tokenizer


def define_flags(fv: flags.FlagValues) -> None:
    from pipelines import prepare, tokenizers

    flags.DEFINE_string("workdir", None, "the run directory to write", flag_values=fv)
    settings.define(fv, prepare.PrepareConfig, exclude=("tokenizer",))
    settings.define(fv, tokenizers.TokenizerConfig, rename=TOKENIZER)
    flags.DEFINE_bool("overwrite", False, "replace a workdir prepared from other inputs, with all its stages",
                      flag_values=fv)
    flags.DEFINE_string("runner", "", "tokenize and write shards as an Apache Beam pipeline on this runner "
                        "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner; '': in this process)", flag_values=fv)
    flags.DEFINE_string("beam_options", "", "the runner's pipeline options, as on Beam's command line "
                        "(--project=... --region=... --temp_location=gs://...)", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import prepare, tokenizers
    from pipelines.progress import Progress

    tokenizer = settings.build(fv, tokenizers.TokenizerConfig, rename=TOKENIZER)
    config = settings.build(fv, prepare.PrepareConfig, tokenizer=tokenizer)
    result = prepare.prepare(config, fv.workdir, overwrite=fv.overwrite, progress=Progress(sys.stderr),
                             runner=fv.runner, beam_options=shlex.split(fv.beam_options))
    print(prepare.summary(result.manifest), file=sys.stderr)
    splits = result.manifest["splits"]
    print(json.dumps({"workdir": str(result.workdir.root), "reused": result.reused,
                      "vocab_size": result.manifest["tokenizer"]["vocab_size"],
                      **{f"{name}_tokens": split["tokens"] for name, split in splits.items()}}))
    return 0
