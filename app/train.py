"""Train the workdir's model under a tf.distribute strategy; rerun the same command to resume.

Builds the model from --model and --preset (plus overrides), trains it with
Keras fit + AdamW (warmup, cosine decay, clipping) on the workdir's shards,
saves checkpoints/ckpt-STEP every --checkpoint_every steps, validates every
--eval_every steps, logs to WORKDIR/logs (TensorBoard) and ends with a summary
and WORKDIR/metrics.json. After a crash or `kill -9`, the same command resumes
from the last checkpoint and stops at --steps.

With --lora_rank=R, the workdir's trained or imported transformer keeps its
weights and trains LoRA adapters only (--lora_alpha, --lora_targets);
every later stage sees the adapters merged into the kernels.

examples:
  lmstack train --workdir=runs/shakespeare --model=transformer --preset=small --steps=1500
  lmstack train --workdir=runs/smollm --lora_rank=8 --steps=500   # after lmstack import and prepare
  lmstack train --workdir=runs/shakespeare --model=lstm --strategy=mirrored --logical_cpus=2
  lmstack launch --workers=2 -- train --workdir=runs/shakespeare --model=transformer --strategy=multi_worker
"""

from __future__ import annotations

import json
import sys

from absl import flags

from app import settings


NOT_OVERRIDDEN = ("vocab_size",)  # the model's vocabulary is the tokenizer's
LORA_PREFIX = "lora_"  # the model settings that add LoRA adapters to a trained model (`_with_adapters`)
RESULT_KEYS = ("model", "params", "steps", "loss", "perplexity", "bits_per_char", "tokens_per_s", "wall_seconds",
               "dropout")


def define_flags(fv: flags.FlagValues) -> None:
    import models
    from pipelines import train

    flags.DEFINE_string("workdir", None, "a prepared workdir", flag_values=fv)
    flags.DEFINE_enum("model", "transformer", list(models.FAMILIES), "model family", flag_values=fv)
    presets = list(dict.fromkeys(p for cls in models.FAMILIES.values() for p in cls.PRESETS))
    flags.DEFINE_enum("preset", "small", presets, "model size preset (gpt2, gpt2-medium: the transformer's GPT-2 "
                      "shapes; llama-*: Llama's block at lmstack's shapes; smollm-135m: SmolLM-135M's)", flag_values=fv)
    for name in settings.define_overrides(fv, models.FAMILIES, exclude=NOT_OVERRIDDEN):
        if name.startswith(LORA_PREFIX):  # not an override of a preset: adapters on the trained model
            fv[name].help = settings.field_help(models.GPTConfig)[name].rstrip(".") + (
                "" if name == "lora_rank" else " (with --lora_rank)")
    settings.define(fv, train.TrainConfig)
    settings.define_progress(fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def _with_adapters(fv: flags.FlagValues, adapters: dict, shape: dict):
    """The workdir's trained (or imported) model with LoRA adapters (`--lora_rank`, ...)."""
    import dataclasses

    import models
    from pipelines import checkpoints
    from pipelines.errors import UserError

    if "lora_rank" not in adapters:
        raise UserError(f"{', '.join('--' + k for k in adapters)} set(s) LoRA adapters up; add --lora_rank=R")
    if fv["model"].present or fv["preset"].present or shape:
        raise UserError(f"--lora_rank adds adapters to the model trained in {fv.workdir}, which keeps its shape; "
                        f"drop --model, --preset and the model flags ({', '.join(shape) or 'none given'})")
    import tensorflow as tf

    if tf.train.latest_checkpoint(checkpoints.checkpoint_dir(fv.workdir)) is None:
        raise UserError(f"--lora_rank trains adapters on trained weights, and {fv.workdir} has none yet; run "
                        f"`lmstack train` or `lmstack import` first")
    base = checkpoints.read_model_config(fv.workdir)
    if not isinstance(base, models.GPTConfig):
        raise UserError(f"--lora_rank adapts a transformer's projections; {fv.workdir} holds an "
                        f"{models.family_of(base)}, train it whole")
    try:
        return dataclasses.replace(base, **adapters)
    except (ValueError, TypeError) as e:
        raise UserError(f"{', '.join(f'--{k}={v}' for k, v in adapters.items())}: {e}") from None


def run(fv: flags.FlagValues) -> int:

    import models
    from pipelines import checkpoints, train, workdir
    from pipelines.errors import UserError
    from pipelines.progress import Progress

    if checkpoints.classifier_section(fv.workdir) is not None:
        raise UserError(f"{fv.workdir} is a classifier workdir (made by `lmstack finetune`); train a language "
                        "model in a workdir made by `lmstack prepare`")
    wd = workdir.Workdir(fv.workdir)
    manifest = wd.read_manifest()
    overrides = settings.overrides(fv)
    adapters = {k: v for k, v in overrides.items() if k.startswith(LORA_PREFIX)}
    shape = {k: v for k, v in overrides.items() if not k.startswith(LORA_PREFIX)}
    if adapters:
        model_config = _with_adapters(fv, adapters, shape)
    else:
        if wd.is_imported() and (fv["model"].present or fv["preset"].present or shape):
            raise UserError(f"{fv.workdir} holds an imported model, which keeps its shape; drop --model, --preset "
                            f"and the model flags ({', '.join(shape) or 'none given'}) to continue training it")
        try:
            if wd.is_imported():  # continued pre-training: the checkpoint's own shape
                model_config = checkpoints.read_model_config(fv.workdir)
            else:
                model_config = models.make_config(fv.model, fv.preset, manifest["tokenizer"]["vocab_size"], **shape)
        except (ValueError, TypeError) as e:
            raise UserError(f"--model={fv.model} --preset={fv.preset} with {shape or 'no overrides'}: {e}") from None
    config = settings.build(fv, train.TrainConfig)
    summary = train.train(fv.workdir, model_config, config, Progress(sys.stderr),
                          verbose=settings.keras_verbose(fv.progress))
    print(train.describe(summary), file=sys.stderr)
    print(json.dumps({"workdir": fv.workdir, **{k: summary.get(k) for k in RESULT_KEYS}}))
    return 0
