"""Read a text corpus, learn a tokenizer and write train/val token shards.

Reads UTF-8 text files, globs and .gz files; holds out contiguous blocks of
lines for validation; learns the tokenizer on the training text; writes
WORKDIR/tokenizer/, WORKDIR/data/ (GZIP TFRecord shards + manifest.json) and
WORKDIR/config.json. Rerunning with the same inputs reuses the workdir.

example:
  lmstack prepare --corpus=data/shakespeare.txt.gz --workdir=runs/shakespeare --tokenizer=char
"""

from __future__ import annotations

import sys

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("corpus", None, "text files or globs, comma-separated (.gz is decompressed)", flag_values=fv)
    flags.DEFINE_string("workdir", None, "the run directory to write", flag_values=fv)
    flags.DEFINE_enum("tokenizer", "char", ["char", "byte", "wordpiece", "sentencepiece"],
                      "tokenizer to learn", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 0, "vocabulary size including the 4 reserved tokens; 0: all characters "
                         "(char), 260 (byte), 8000 (wordpiece, sentencepiece)", flag_values=fv)
    flags.DEFINE_bool("lowercase", False, "fold case first (wordpiece, sentencepiece)", flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.1, "share of the corpus held out for validation, in blocks of lines",
                       flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed that picks the validation blocks", flag_values=fv)
    flags.DEFINE_enum("encoding_errors", "strict", ["strict", "replace"],
                      "on bytes that are not UTF-8: stop (strict) or use U+FFFD (replace)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a workdir prepared from other inputs, with all its stages",
                      flag_values=fv)
    flags.mark_flags_as_required(["corpus", "workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import prepare, tokenizers
    from pipelines.progress import Progress

    config = prepare.PrepareConfig(
        corpus=tuple(fv.corpus),
        tokenizer=tokenizers.TokenizerConfig(fv.tokenizer, fv.vocab_size, fv.lowercase),
        val_fraction=fv.val_fraction, seed=fv.seed, encoding_errors=fv.encoding_errors)
    result = prepare.prepare(config, fv.workdir, overwrite=fv.overwrite, progress=Progress(sys.stderr))
    print(prepare.summary(result.manifest))
    print(f"workdir: {result.workdir.root}" + (" (reused)" if result.reused else ""))
    return 0
