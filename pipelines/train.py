"""`train`: Keras `fit` under a tf.distribute strategy, resumable after a kill.

    strategy.scope(): build the model, AdamW (warmup + cosine, global-norm
    clipping), token cross-entropy; fit on `dataset.train_dataset` with the
    global batch = per-replica batch x replicas.

Fault tolerance is TensorFlow's own: `BackupAndRestore` saves model,
optimizer, epoch and batch every `checkpoint_every` steps in
`checkpoints/backup/`, and a rerun of the same command resumes there
(mid-epoch) and stops at the requested step. The checkpoints later stages
read are `checkpoints/ckpt-STEP` (model + optimizer, the last K kept). Under
MultiWorkerMirroredStrategy every worker saves, but only the chief into the
workdir; the others write to temporary directories.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Any

import tensorflow as tf

import models
from models import lora
from models.backend import keras
from pipelines import callbacks as callbacks_lib
from pipelines import checkpoints, data_service, dataset, evaluate
from pipelines import strategy as strategy_lib
from pipelines import training
from pipelines import workdir as workdir_lib
from pipelines.training import TrainConfig  # the stage's settings
from pipelines.errors import UserError
from pipelines.progress import Progress

TRAIN_SECTION = "train"
# Settings a resumed run must share with the run that wrote the checkpoints (with the
# whole model config). The optimizer's settings may change: lowering the learning
# rate after a divergence is how one recovers.
RESUME_KEYS = ("batch_size", "grad_accum_steps", "mixed_precision", "seed")


def _has_files(path: str) -> bool:
    return tf.io.gfile.isdir(path) and any(files for _, _, files in tf.io.gfile.walk(path))


def _strategy_name(strategy: tf.distribute.Strategy) -> str:
    return {"_DefaultDistributionStrategy": "default"}.get(type(strategy).__name__, type(strategy).__name__)


# Dropout for a run that sees its training data at least DROPOUT_EPOCHS times; below that, none:
# a model that has not yet seen a token twice cannot overfit it, and dropout only slows learning
# (docs/results.md, "Quality": 0.1 costs ~0.1-0.3 bits/char on runs of about one epoch).
DROPOUT = 0.1
DROPOUT_EPOCHS = 2.0


def epochs_of(manifest: dict[str, Any], steps: int, global_batch: int, seq_len: int) -> float:
    """How many times `steps` steps of `global_batch` x `seq_len` tokens go over the training split."""
    return steps * global_batch * seq_len / max(1, manifest["splits"]["train"]["tokens"])


def run_dropout(model_config: models.ModelConfig, epochs: float, resumed: models.ModelConfig | None = None):
    """The model config with its dropout decided, and why (None when it was given).

    A config whose `dropout` is None gets `DROPOUT` if the run covers its data at least
    `DROPOUT_EPOCHS` times, else 0; a resumed run keeps the dropout it was trained with.
    """
    if model_config.dropout is not None:
        return model_config, None
    if resumed is not None and resumed.dropout is not None:
        return dataclasses.replace(model_config, dropout=resumed.dropout), "as the run being resumed"
    rate = DROPOUT if epochs >= DROPOUT_EPOCHS else 0.0
    side = "at least" if rate else "fewer than"
    return dataclasses.replace(model_config, dropout=rate), (
        f"the run sees its training data {epochs:.2f} times, {side} {DROPOUT_EPOCHS:g}; --dropout sets it")


def _resumed_model(wd: workdir_lib.Workdir) -> dict[str, Any] | None:
    """The model config (JSON) of the checkpoints in the workdir, if it has any."""
    saved = wd.read_config()
    if "model" not in saved or not tf.io.gfile.isdir(checkpoints.checkpoint_dir(wd.root)):
        return None
    return saved["model"]


def _check_resume(wd: workdir_lib.Workdir, model_config: models.ModelConfig, config: TrainConfig) -> None:
    old_model = _resumed_model(wd)
    if old_model is None:
        return
    saved = wd.read_config()
    old_model = models.config_to_json(models.config_from_json(old_model))  # settings added since: their defaults
    new_model = models.config_to_json(model_config)
    # LoRA adapters on the trained model: its shape must be the one trained; how it was trained may differ.
    new_adapters = not old_model.get("lora_rank") and getattr(model_config, "lora_rank", 0)
    if new_adapters:
        new_model = models.config_to_json(lora.plain_config(model_config))
    diffs = [f"{k}={old_model.get(k)!r} (now {v!r})" for k, v in new_model.items() if old_model.get(k) != v]
    old_train = {} if new_adapters else saved.get(TRAIN_SECTION, {})
    diffs += [f"{k}={old_train.get(k)!r} (now {getattr(config, k)!r})" for k in RESUME_KEYS
              if k in old_train and old_train[k] != getattr(config, k)]
    if diffs:
        raise UserError(
            f"{wd.root} holds checkpoints trained with other settings: {', '.join(diffs)}; "
            "rerun with the same flags to resume, or use a new --workdir")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run decides before it builds anything.

    Attributes:
        wd: the workdir.
        model_config: the model, its dropout decided (`run_dropout`).
        config: how to train, resolved for this model (`TrainConfig.for_model`).
        manifest: the prepared data's manifest.
        strategy: the tf.distribute strategy; `chief` is whether this process writes the workdir.
        global_batch: sequences per optimizer step (per-replica batch x replicas x accumulated batches).
        dropout_why: why the dropout is what it is (None when it was given).
        steps_per_epoch: Keras epochs are the evaluation interval (or the whole run).
        per_call: steps Keras runs per call (`training.steps_per_execution`).
        latest: the newest checkpoint in the workdir, if any.
        new_adapters: LoRA adapters start on `latest`, a checkpoint without them: its weights are
            the frozen base, and the adapters' run counts its steps from 0.
    """
    wd: workdir_lib.Workdir
    model_config: models.ModelConfig
    config: TrainConfig
    manifest: dict[str, Any]
    strategy: tf.distribute.Strategy
    chief: bool
    global_batch: int
    dropout_why: str | None
    steps_per_epoch: int
    per_call: int
    latest: str | None
    new_adapters: bool = False

    @property
    def seq_len(self) -> int:
        return self.model_config.seq_len

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def train(workdir: str | os.PathLike, model_config: models.ModelConfig, config: TrainConfig,
          progress: Progress | None = None, verbose: int = 1) -> dict[str, Any]:
    """Trains (or resumes training) the workdir's model to `config.steps` steps.

    Args:
        workdir: a prepared workdir.
        model_config: the model to build (its vocab_size must match the tokenizer).
        config: how to train.
        progress: where notes go; Keras prints its own progress bar (`verbose`).
        verbose: Keras's progress bar: 0 none, 1 bar, 2 one line per epoch.
    Returns:
        The summary written to metrics.json (chief), with evaluation results.
    Raises:
        UserError: bad settings, an unprepared workdir, a resume with other settings, a NaN loss.
    """
    progress = progress or Progress()
    plan = make_plan(workdir, model_config, config, progress)
    if plan.chief:
        checkpoints.save_model_config(plan.wd.root, plan.model_config)
        plan.wd.update_config(TRAIN_SECTION, dataclasses.asdict(plan.config))
    with plan.strategy.scope():
        model = training.build_and_compile(plan.model_config, plan.config, plan.per_call)
    start = _restore(plan, model)
    if start >= plan.config.steps:
        progress.note(f"{plan.wd.root} is already trained to step {start} (asked for {plan.config.steps}); "
                      "nothing to do")
        evaluation = evaluate.evaluate_model(plan.wd.root, model, plan.model_config, write=plan.chief)
        return {"model": models.family_of(plan.model_config), "params": plan.model_config.num_params(),
                "steps": start, "tokens_per_s": None, "wall_seconds": 0.0, "dropout": plan.model_config.dropout,
                **evaluation}
    train_ds, val_ds, val_steps = _datasets(plan, progress)
    # Every worker saves (MultiWorkerMirroredStrategy needs it), only the chief into the workdir.
    ckpt_dir = checkpoints.checkpoint_dir(plan.wd.root) if plan.chief else \
        tempfile.mkdtemp(prefix="lmstack-worker-ckpt-")
    log: dict[str, Any] = {}
    callbacks = _callbacks(plan, model, ckpt_dir, progress, log)
    began = time.perf_counter()
    try:
        with callbacks_lib.quiet_callback_timing():
            history = model.fit(train_ds, epochs=math.ceil(plan.config.steps / plan.steps_per_epoch),
                                steps_per_epoch=plan.steps_per_epoch, initial_epoch=start // plan.steps_per_epoch,
                                validation_data=val_ds, validation_steps=val_steps, callbacks=callbacks,
                                verbose=verbose)
    finally:
        if not plan.chief:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary = _summary(plan, model, history, log, start, wall=time.perf_counter() - began)
    if plan.chief:
        workdir_lib.write_json(plan.wd.root / evaluate.METRICS_FILE, summary)
    return summary


def make_plan(workdir: str | os.PathLike, model_config: models.ModelConfig, config: TrainConfig,
              progress: Progress) -> Plan:
    """Checks the settings against the workdir, makes the strategy and decides what the run does;
    writes nothing. Raises UserError on what cannot train."""
    config.validate()
    if config.data_service:  # before anything is written: without a dispatcher training would wait forever
        config = dataclasses.replace(config, data_service=data_service.check_address(config.data_service))
    wd = workdir_lib.Workdir(workdir)
    config = config.for_model(model_config, pretrained=wd.is_imported())
    manifest = wd.read_manifest()
    config = config.for_data(manifest["splits"]["train"]["tokens"], model_config.seq_len)
    vocab = manifest["tokenizer"]["vocab_size"]
    if model_config.vocab_size != vocab:
        raise UserError(f"the model's vocab_size={model_config.vocab_size} differs from the tokenizer's {vocab}")
    dataset.shard_files(wd.root, "val")  # the final evaluation needs it: fail now, not after training

    strategy_lib.split_cpu(config.logical_cpus)
    strategy = strategy_lib.make(config.strategy)
    strategy_lib.check_jit_compile(strategy, config.jit_compile)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas * config.grad_accum_steps
    seq_len = model_config.seq_len
    resumed = _resumed_model(wd)
    model_config, why = run_dropout(model_config, epochs_of(manifest, config.steps, global_batch, seq_len),
                                    models.config_from_json(resumed) if resumed else None)
    if why:
        progress.note(f"dropout {model_config.dropout:g}: {why}")
    _check_resume(wd, model_config, config)
    keras.mixed_precision.set_global_policy(strategy_lib.PRECISIONS[config.mixed_precision])
    keras.utils.set_random_seed(config.seed)
    progress.note(f"training {models.family_of(model_config)} ({model_config.num_params():,} parameters) with "
                  f"{_strategy_name(strategy)} on {replicas} replica(s), global batch {global_batch} x {seq_len}"
                  + (f" ({config.grad_accum_steps} accumulated batches of {global_batch // config.grad_accum_steps})"
                     if config.grad_accum_steps > 1 else ""))
    if config.jit_compile and models.family_of(model_config) == "lstm" and not tf.config.list_physical_devices("GPU"):
        progress.note("note: with --jit_compile, XLA compiles tf_keras's LSTM step again at every step "
                      "(~2.5 s each on CPU, docs/results.md: Training speed); drop --jit_compile for the LSTM")

    steps_per_epoch = min(config.eval_every or config.steps, config.steps)
    latest = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(wd.root))
    new_adapters = bool(getattr(model_config, "lora_rank", 0)) and latest is not None and not any(
        "lora_a" in name for name, _ in tf.train.list_variables(latest))
    if new_adapters:
        progress.note(f"LoRA adapters of rank {model_config.lora_rank} on {', '.join(model_config.lora_targets)}, "
                      f"over the weights of {latest.rsplit('/', 1)[-1]} (frozen)")
    first = int(latest.rsplit("-", 1)[1]) if latest and not new_adapters else 0
    # The profiler traces steps by Keras's batch count, so a traced run goes one step per call.
    per_call = 1 if config.profile_range() else training.steps_per_execution(
        config.steps, steps_per_epoch, config.checkpoint_every, first)
    return Plan(wd, model_config, config, manifest, strategy, strategy_lib.is_chief(strategy), global_batch, why,
                steps_per_epoch, per_call, latest, new_adapters)


def _restore(plan: Plan, model: keras.Model) -> int:
    """Continues a finished run from its last checkpoint (an interrupted one resumes from its backup,
    in `fit`); returns the step training starts from."""
    backup_dir = str(plan.wd.root / checkpoints.CHECKPOINT_DIR / "backup")
    if plan.latest and not _has_files(backup_dir):  # a finished run deletes its backup at the end
        # New adapters take the weights only: their steps start afresh (the optimizer holds slots for
        # the adapters alone, so the base's others are not restored).
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(plan.latest).expect_partial()
        if plan.new_adapters:
            model.optimizer.iterations.assign(0)
    return int(model.optimizer.iterations.numpy())


def _datasets(plan: Plan, progress: Progress) -> tuple[tf.data.Dataset, tf.data.Dataset | None, int | None]:
    """(training batches, validation batches or None, validation steps or None)."""
    config, root = plan.config, plan.wd.root
    train_ds = dataset.train_dataset(root, plan.seq_len, plan.global_batch, seed=config.seed)
    if config.data_service:
        job = f"lmstack-train:{root}:{config.seed}"  # one job per run: its workers share the batches
        train_ds = data_service.distribute(train_ds, config.data_service, job)
        progress.note(f"training batches from the tf.data service at {config.data_service} (job {job})")
    if not (config.eval_every and config.eval_batches):
        return train_ds, None, None
    val_ds = dataset.val_dataset(root, plan.seq_len, plan.global_batch // config.grad_accum_steps).take(
        config.eval_batches)
    # Keras needs the count to run several steps per call; the split may hold fewer batches.
    val_steps = sum(1 for _ in val_ds) or None
    return train_ds, (val_ds if val_steps else None), val_steps


def _callbacks(plan: Plan, model: keras.Model, ckpt_dir: str, progress: Progress,
               log: dict[str, Any]) -> list[keras.callbacks.Callback]:
    """NaN guard, derived metrics, backup for resume, checkpoints, the stop step, TensorBoard (chief)."""
    config = plan.config
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=model.optimizer), ckpt_dir,
                                         max_to_keep=config.keep_checkpoints)
    backup_dir = str(plan.wd.root / checkpoints.CHECKPOINT_DIR / "backup")
    callbacks = [
        callbacks_lib.NaNGuard(),
        callbacks_lib.DerivedMetrics(training.tokens_per_char(plan.manifest)),
        callbacks_lib.BackupAndRestore(backup_dir, save_freq=config.checkpoint_every // plan.per_call),
        callbacks_lib.Checkpointer(manager, config.checkpoint_every, plan.global_batch * plan.seq_len, progress,
                                   log),
        callbacks_lib.StopAtStep(config.steps),
    ]
    if plan.chief:
        callbacks.append(keras.callbacks.TensorBoard(str(plan.wd.root / "logs"), update_freq=50,
                                                     profile_batch=config.profile_range() or 0))
    return callbacks


def _summary(plan: Plan, model: keras.Model, history, log: dict[str, Any], start: int,
             wall: float) -> dict[str, Any]:
    """The final evaluation with what the run did: what metrics.json holds."""
    summary = evaluate.evaluate_model(plan.wd.root, model, plan.model_config, write=False)
    steps = int(model.optimizer.iterations.numpy())
    summary.update({
        "model": models.family_of(plan.model_config), "params": plan.model_config.num_params(),
        "steps": steps, "global_batch": plan.global_batch, "seq_len": plan.seq_len,
        "replicas": plan.replicas, "strategy": _strategy_name(plan.strategy), "dropout": plan.model_config.dropout,
        "dropout_chosen_because": plan.dropout_why,
        "train_loss": float(history.history["loss"][-1]) if history.history.get("loss") else None,
        "tokens_per_s": log.get("tokens_per_s"), "wall_seconds": round(wall, 1),
        "trained_steps_this_run": steps - log.get("start_step", start),
    })
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The end-of-training summary, for people."""
    rate = summary.get("tokens_per_s")
    return "\n".join([
        f"trained {summary['model']} ({summary['params']:,} parameters) to step {summary['steps']} "
        f"in {summary['wall_seconds']} s" + (f", {rate:,.0f} tokens/s" if rate else ""),
        f"validation: loss {summary['loss']:.4f} nats/token, perplexity {summary['perplexity']:.2f}, "
        f"{summary['bits_per_char']:.3f} bits/char over {summary['tokens']:,} tokens",
    ] + ([f"dropout {summary['dropout']:g}: {summary['dropout_chosen_because']}"]
         if summary.get("dropout_chosen_because") else []))
