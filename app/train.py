"""Train the workdir's model under a tf.distribute strategy; rerun the same command to resume.

Builds the model from --model and --preset (plus overrides), trains it with
Keras fit + AdamW (warmup, cosine decay, clipping) on the workdir's shards,
saves checkpoints/ckpt-STEP every --checkpoint_every steps, validates every
--eval_every steps, logs to WORKDIR/logs (TensorBoard) and ends with a summary
and WORKDIR/metrics.json. After a crash or `kill -9`, the same command resumes
from the last checkpoint and stops at --steps.

examples:
  lmstack train --workdir=runs/shakespeare --model=transformer --preset=small --steps=1500
  lmstack train --workdir=runs/shakespeare --model=lstm --strategy=mirrored --logical_cpus=2
  lmstack launch --workers=2 -- train --workdir=runs/shakespeare --model=transformer --strategy=multi_worker
"""

from __future__ import annotations

import sys

from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
    d = flags
    d.DEFINE_string("workdir", None, "a prepared workdir", flag_values=fv)
    d.DEFINE_enum("model", "transformer", ["transformer", "lstm"], "model family", flag_values=fv)
    d.DEFINE_enum("preset", "small", ["tiny", "small", "base"], "model size preset", flag_values=fv)
    d.DEFINE_integer("layers", None, "override: transformer blocks / recurrent layers", flag_values=fv)
    d.DEFINE_integer("d_model", None, "override: transformer width", flag_values=fv)
    d.DEFINE_integer("heads", None, "override: attention heads", flag_values=fv)
    d.DEFINE_integer("units", None, "override: LSTM units", flag_values=fv)
    d.DEFINE_integer("embedding_dim", None, "override: LSTM embedding width", flag_values=fv)
    d.DEFINE_enum("cell", None, ["lstm", "gru"], "override: recurrent cell", flag_values=fv)
    d.DEFINE_bool("tie_embeddings", None, "override: LSTM output through the embedding table", flag_values=fv)
    d.DEFINE_integer("seq_len", None, "override: tokens per training sequence (the transformer's context)",
                     flag_values=fv)
    d.DEFINE_float("dropout", None, "override: dropout rate", flag_values=fv)
    d.DEFINE_integer("batch_size", 32, "sequences per replica (global batch = this x replicas)", flag_values=fv)
    d.DEFINE_integer("steps", 1000, "optimizer steps in all", flag_values=fv)
    d.DEFINE_integer("epochs", None, "train this many passes over the training windows instead of --steps",
                     flag_values=fv)
    d.DEFINE_float("learning_rate", None, "peak learning rate (default: the model's own, 3e-3 for the small "
                   "transformer, 5e-3 for the small LSTM, lower for wider models)", flag_values=fv)
    d.DEFINE_integer("warmup_steps", None, "linear warmup steps (default: a tenth of --steps, at most 100)",
                     flag_values=fv)
    d.DEFINE_enum("schedule", "cosine", ["cosine", "constant"], "learning-rate schedule after warmup",
                  flag_values=fv)
    d.DEFINE_float("weight_decay", 0.01, "AdamW weight decay", flag_values=fv)
    d.DEFINE_float("clip_norm", 1.0, "global gradient-norm clipping (0: off)", flag_values=fv)
    d.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored", "multi_worker"],
                  "tf.distribute strategy", flag_values=fv)
    d.DEFINE_integer("logical_cpus", 0, "split the CPU into N devices (run --strategy=mirrored without GPUs)",
                     flag_values=fv)
    d.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "fp16"], "mixed precision policy", flag_values=fv)
    d.DEFINE_bool("jit_compile", False, "XLA-compile the train step (one replica or GPUs)", flag_values=fv)
    d.DEFINE_integer("eval_every", 200, "validate every N steps (0: only at the end)", flag_values=fv)
    d.DEFINE_integer("eval_batches", 50, "validation batches per periodic evaluation", flag_values=fv)
    d.DEFINE_integer("checkpoint_every", 200, "save a checkpoint every N steps", flag_values=fv)
    d.DEFINE_integer("keep_checkpoints", 3, "checkpoints kept", flag_values=fv)
    d.DEFINE_integer("seed", 0, "model initialization and data order", flag_values=fv)
    d.DEFINE_string("profile_steps", "", "FIRST,LAST steps to trace with the TF profiler (TensorBoard)",
                    flag_values=fv)
    d.DEFINE_enum("progress", "bar", ["bar", "epoch", "none"],
                  "Keras progress output (bar: on a terminal; a line per epoch into a file or pipe)", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


MODEL_FLAGS = ("layers", "d_model", "heads", "units", "embedding_dim", "cell", "tie_embeddings", "seq_len", "dropout")


def run(fv: flags.FlagValues) -> int:
    import models
    from pipelines import checkpoints, train, workdir
    from pipelines.errors import UserError
    from pipelines.progress import Progress

    if checkpoints.classifier_section(fv.workdir) is not None:
        raise UserError(f"{fv.workdir} is a classifier workdir (made by `lmstack finetune`); train a language "
                        "model in a workdir made by `lmstack prepare`")
    manifest = workdir.Workdir(fv.workdir).read_manifest()
    overrides = {name: fv[name].value for name in MODEL_FLAGS if fv[name].value is not None}
    try:
        model_config = models.make_config(fv.model, fv.preset, manifest["tokenizer"]["vocab_size"], **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"--model={fv.model} --preset={fv.preset} with {overrides or 'no overrides'}: {e}") from None
    steps = fv.steps
    if fv.epochs is not None:
        windows = manifest["splits"]["train"]["tokens"] // (model_config.seq_len + 1)
        steps = max(1, fv.epochs * windows // fv.batch_size)
    config = train.TrainConfig(
        steps=steps, batch_size=fv.batch_size, learning_rate=fv.learning_rate, warmup_steps=fv.warmup_steps,
        schedule=fv.schedule, weight_decay=fv.weight_decay, clip_norm=fv.clip_norm, strategy=fv.strategy,
        mixed_precision=fv.mixed_precision, jit_compile=fv.jit_compile, eval_every=fv.eval_every,
        eval_batches=fv.eval_batches, checkpoint_every=fv.checkpoint_every, keep_checkpoints=fv.keep_checkpoints,
        seed=fv.seed, profile_steps=fv.profile_steps, logical_cpus=fv.logical_cpus)
    # Keras's bar redraws itself with backspaces on stdout: into a file or pipe that is one line growing by
    # ~70 bytes a step, so there the bar becomes a line per epoch.
    verbose = {"bar": 1 if sys.stdout.isatty() else 2, "epoch": 2, "none": 0}[fv.progress]
    summary = train.train(fv.workdir, model_config, config, Progress(sys.stderr), verbose=verbose)
    print(train.describe(summary))
    return 0
