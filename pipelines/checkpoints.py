"""Model checkpoints in a workdir: `WORKDIR/checkpoints/` + the model config in config.json.

The model's config is saved with its weights (config.json's `model`
section), so every later stage rebuilds the same model from the workdir alone.
An optimized variant, `WORKDIR/optimized/NAME/`, has the same layout plus an
`optimization` section saying how it was made; a quantization-aware variant
is rebuilt with TF-MOT's wrappers before its weights are restored.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

import models
from models import lora
from pipelines import fs
from pipelines import workdir as workdir_lib
from pipelines.errors import UserError

CHECKPOINT_DIR = "checkpoints"
MODEL_SECTION = "model"
OPTIMIZED_DIR = "optimized"
OPTIMIZATION_SECTION = "optimization"
CLASSIFIER_SECTION = "classifier"  # a classifier workdir (`lmstack finetune`), not a language model


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return str(workdir_lib.Workdir(workdir).root / CHECKPOINT_DIR)


def manager(workdir: str | os.PathLike, checkpoint: tf.train.Checkpoint, max_to_keep: int = 3
            ) -> tf.train.CheckpointManager:
    """The workdir's checkpoint manager (keeps the last `max_to_keep`)."""
    return tf.train.CheckpointManager(checkpoint, checkpoint_dir(workdir), max_to_keep=max_to_keep)


def save_model_config(workdir: str | os.PathLike, config: models.ModelConfig) -> None:
    workdir_lib.Workdir(workdir).update_config(MODEL_SECTION, models.config_to_json(config))


def _read_config(source: str | os.PathLike) -> dict[str, Any]:
    # A variant directory has a config.json but no data/ of its own.
    path = fs.path(source) / workdir_lib.CONFIG_FILE
    return workdir_lib.read_json(path) if path.is_file() else workdir_lib.Workdir(source).read_config()


def read_model_config(workdir: str | os.PathLike) -> models.ModelConfig:
    wd = workdir_lib.Workdir(workdir)
    config = _read_config(workdir)
    if CLASSIFIER_SECTION in config:
        raise UserError(f"{wd.root} is a classifier workdir (made by `lmstack finetune`); this command needs a "
                        "language-model run (`lmstack evaluate`, `export` and `tflite` take classifiers too)")
    if MODEL_SECTION not in config:
        raise UserError(f"{wd.root} has no trained model yet; run `lmstack train --workdir={wd.root}` first")
    return models.config_from_json(config[MODEL_SECTION])


def classifier_section(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The `classifier` section of a workdir's config.json (None for a language-model run or no config)."""
    path = workdir_lib.Workdir(workdir).config_path
    return workdir_lib.read_json(path).get(CLASSIFIER_SECTION) if path.is_file() else None


def variants(workdir: str | os.PathLike) -> list[str]:
    """Names of the workdir's optimized variants."""
    root = workdir_lib.Workdir(workdir).root / OPTIMIZED_DIR
    return sorted(p.parent.name for p in root.glob(f"*/{workdir_lib.CONFIG_FILE}")
                  if not p.parent.name.startswith(".") and workdir_lib.published(p.parent))


def model_dir(workdir: str | os.PathLike, variant: str = "") -> fs.Path:
    """Where a model lives: the workdir itself, or WORKDIR/optimized/VARIANT.

    Raises:
        UserError: no such variant.
    """
    root = workdir_lib.Workdir(workdir).root
    if not variant:
        return root
    path = root / OPTIMIZED_DIR / variant
    if variant.startswith(".") or "/" in variant or variant not in variants(root):
        have = variants(root)
        raise UserError(f"no optimized variant {variant!r} in {root} (have: {', '.join(have) or 'none'}); "
                        "run `lmstack optimize` first or drop --variant")
    return path


def optimization(source: str | os.PathLike) -> dict[str, Any] | None:
    """The `optimization` section of a model directory (None for a trained model)."""
    return _read_config(source).get(OPTIMIZATION_SECTION)


def save(workdir: str | os.PathLike, model, config: models.ModelConfig, step: int) -> str:
    """Writes the model's weights as checkpoint `ckpt-STEP` (and its config); returns the path.

    Training saves through its own manager (with the optimizer), in the same layout.
    """
    save_model_config(workdir, config)
    return manager(workdir, tf.train.Checkpoint(model=model)).save(checkpoint_number=step)


def load_model(workdir: str | os.PathLike, merged: bool = True):
    """Rebuilds the model of a workdir (or variant directory) and restores its newest checkpoint.

    Args:
        merged: a model trained with LoRA adapters comes back plain, each adapter folded into its
            kernel (`models.lora.merge`), with its config; False keeps the adapters.
    Returns:
        `(model, config, step)`.
    Raises:
        UserError: no model config or no checkpoint in the workdir.
    """
    config = read_model_config(workdir)
    latest = tf.train.latest_checkpoint(checkpoint_dir(workdir))
    if latest is None:
        raise UserError(f"no checkpoint in {checkpoint_dir(workdir)}; run `lmstack train --workdir={workdir}` first")
    model = models.build(config)
    made = optimization(workdir) or {}
    if made.get("quantized"):
        from pipelines import mot  # TF-MOT's wrappers hold the learned quantization ranges
        model = mot.quantize(model, preserve_sparsity=made.get("preserve_sparsity", False))
    # expect_partial: a training checkpoint also holds the optimizer, not needed here.
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    if merged:
        model, config = lora.merge(model, config)
    return model, config, int(latest.rsplit("-", 1)[1])  # ckpt-STEP
