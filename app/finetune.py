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


def define_flags(fv: flags.FlagValues) -> None:
    d = flags
    d.DEFINE_string("workdir", None, "the classifier workdir to create", flag_values=fv)
    d.DEFINE_string("base", None, "a language-model workdir trained by `lmstack train`", flag_values=fv)
    d.DEFINE_string("train", None, "labelled examples: .csv or .jsonl, optionally .gz / .bz2", flag_values=fv)
    d.DEFINE_string("text_column", "text", "the column (JSON key) holding the text", flag_values=fv)
    d.DEFINE_string("label_column", "label", "the column (JSON key) holding the label", flag_values=fv)
    d.DEFINE_string("val", "", "labelled validation examples (default: hold out --val_fraction of --train)",
                    flag_values=fv)
    d.DEFINE_float("val_fraction", 0.1, "held out of --train per class when --val is not given", flag_values=fv)
    d.DEFINE_string("freeze", "none", "all (train the head only) | none | N (embeddings + bottom N layers)",
                    flag_values=fv)
    d.DEFINE_integer("unfreeze_at", 0, "after this many steps unfreeze everything (0: never)", flag_values=fv)
    d.DEFINE_float("unfreeze_learning_rate", 0.0, "learning rate after unfreezing (0: --learning_rate / 10)",
                   flag_values=fv)
    d.DEFINE_enum("pooling", "mean", ["mean", "last"], "mean: over the text's tokens; last: the final token's state",
                  flag_values=fv)
    d.DEFINE_enum("init", "pretrained", ["pretrained", "scratch"], "the backbone's weights: the base's or random",
                  flag_values=fv)
    d.DEFINE_boolean("baseline", False, "also train the same network from scratch into WORKDIR/baseline",
                     flag_values=fv)
    d.DEFINE_string("model", "", "the model family the base must hold (lstm | transformer; '' any)", flag_values=fv)
    d.DEFINE_string("tokenizer", "", "the tokenizer kind the base must use (char | byte | wordpiece | "
                    "sentencepiece; '' any)", flag_values=fv)
    d.DEFINE_integer("steps", 500, "optimizer steps", flag_values=fv)
    d.DEFINE_integer("batch_size", 32, "examples per replica and step", flag_values=fv)
    d.DEFINE_float("learning_rate", 5e-4, "peak learning rate (warmup, then cosine decay)", flag_values=fv)
    d.DEFINE_integer("warmup_steps", None, "linear warmup steps (default: a tenth of --steps, at most 50)",
                     flag_values=fv)
    d.DEFINE_float("weight_decay", 0.01, "AdamW weight decay", flag_values=fv)
    d.DEFINE_float("clip_norm", 1.0, "global gradient-norm clipping (0: off)", flag_values=fv)
    d.DEFINE_float("dropout", 0.1, "dropout before the head", flag_values=fv)
    d.DEFINE_integer("max_length", 0, "tokens read per text (0: the base's seq_len)", flag_values=fv)
    d.DEFINE_integer("eval_every", 0, "validate every this many steps (0: at the end)", flag_values=fv)
    d.DEFINE_string("strategy", "auto", "auto | default | mirrored | multi_worker", flag_values=fv)
    d.DEFINE_integer("logical_cpus", 0, "split the CPU into this many devices (mirrored without GPUs)",
                     flag_values=fv)
    d.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "fp16"], "compute precision", flag_values=fv)
    d.DEFINE_boolean("jit_compile", False, "XLA-compile the train step (one replica or GPUs)", flag_values=fv)
    d.DEFINE_boolean("overwrite", False, "replace an existing classifier workdir", flag_values=fv)
    d.DEFINE_integer("seed", 0, "split, initialization and data order", flag_values=fv)
    d.DEFINE_enum("progress", "bar", ["bar", "epoch", "none"], "Keras progress output", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "base", "train"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    from pipelines import finetune
    from pipelines.progress import Progress

    config = finetune.FinetuneConfig(
        base=fv.base, train=fv.train, text_column=fv.text_column, label_column=fv.label_column, val=fv.val,
        val_fraction=fv.val_fraction, freeze=fv.freeze, unfreeze_at=fv.unfreeze_at,
        unfreeze_learning_rate=fv.unfreeze_learning_rate, pooling=fv.pooling, init=fv.init, baseline=fv.baseline,
        model=fv.model, tokenizer=fv.tokenizer, steps=fv.steps, batch_size=fv.batch_size,
        learning_rate=fv.learning_rate, warmup_steps=fv.warmup_steps, weight_decay=fv.weight_decay,
        clip_norm=fv.clip_norm, dropout=fv.dropout, max_length=fv.max_length, eval_every=fv.eval_every,
        strategy=fv.strategy, logical_cpus=fv.logical_cpus, mixed_precision=fv.mixed_precision,
        jit_compile=fv.jit_compile, overwrite=fv.overwrite, seed=fv.seed)
    verbose = {"bar": 1 if sys.stdout.isatty() else 2, "epoch": 2, "none": 0}[fv.progress]  # as in `train`
    summary = finetune.finetune(fv.workdir, config, progress=Progress(sys.stderr), verbose=verbose)
    print(finetune.describe(summary), file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("path", "accuracy", "macro_f1", "examples", "trainable_params",
                                              "params") if k in summary}
                     | ({"baseline_accuracy": summary["baseline"]["accuracy"]} if "baseline" in summary else {})))
    return 0
