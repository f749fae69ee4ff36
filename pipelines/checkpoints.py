"""Model checkpoints in a workdir: `WORKDIR/checkpoints/` + the model config in config.json.

The model's config is saved with its weights (config.json's `model`
section), so every later stage rebuilds the same model from the workdir alone.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

import models
from pipelines import workdir as workdir_lib
from pipelines.errors import UserError

CHECKPOINT_DIR = "checkpoints"
MODEL_SECTION = "model"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return str(workdir_lib.Workdir(workdir).root / CHECKPOINT_DIR)


def manager(workdir: str | os.PathLike, checkpoint: tf.train.Checkpoint, max_to_keep: int = 3
            ) -> tf.train.CheckpointManager:
    """The workdir's checkpoint manager (keeps the last `max_to_keep`)."""
    return tf.train.CheckpointManager(checkpoint, checkpoint_dir(workdir), max_to_keep=max_to_keep)


def save_model_config(workdir: str | os.PathLike, config: models.ModelConfig) -> None:
    workdir_lib.Workdir(workdir).update_config(MODEL_SECTION, models.config_to_json(config))


def read_model_config(workdir: str | os.PathLike) -> models.ModelConfig:
    wd = workdir_lib.Workdir(workdir)
    config: dict[str, Any] = wd.read_config()
    if MODEL_SECTION not in config:
        raise UserError(f"{wd.root} has no trained model yet; run `lmstack train --workdir={wd.root}` first")
    return models.config_from_json(config[MODEL_SECTION])


def save(workdir: str | os.PathLike, model, config: models.ModelConfig, step: int) -> str:
    """Writes the model's weights as checkpoint `ckpt-STEP` (and its config); returns the path.

    Training saves through its own manager (with the optimizer), in the same layout.
    """
    save_model_config(workdir, config)
    return manager(workdir, tf.train.Checkpoint(model=model)).save(checkpoint_number=step)


def load_model(workdir: str | os.PathLike):
    """Rebuilds the workdir's model and restores its newest checkpoint.

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
    # expect_partial: a training checkpoint also holds the optimizer, not needed here.
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model, config, int(latest.rsplit("-", 1)[1])  # ckpt-STEP
