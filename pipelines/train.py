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
import typing
from typing import Any, Literal

import tensorflow as tf

import models
from models.backend import keras
from pipelines import callbacks as callbacks_lib
from pipelines import checkpoints, dataset, evaluate
from pipelines import strategy as strategy_lib
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_at_least, check_choice
from pipelines.progress import Progress

Schedule = Literal["cosine", "constant"]
SCHEDULES = typing.get_args(Schedule)
TRAIN_SECTION = "train"
# Settings a resumed run must share with the run that wrote the checkpoints (with the
# whole model config). The optimizer's settings may change: lowering the learning
# rate after a divergence is how one recovers.
RESUME_KEYS = ("batch_size", "mixed_precision", "seed")


@dataclasses.dataclass(frozen=True)
class TrainConfig(strategy_lib.Devices):
    """How to train (and, from `Devices`, where: strategy, logical_cpus, mixed_precision, jit_compile).

    Attributes:
        steps: optimizer steps in all (a rerun with more steps continues).
        batch_size: sequences per replica; the global batch is this x replicas.
        learning_rate: peak learning rate, reached after warmup_steps (default: the model's own,
            `peak_learning_rate`: 3e-3 for the small transformer, 5e-3 for the small LSTM, lower for
            wider models).
        warmup_steps: linear warmup from 0 (default: a tenth of steps, at most 100, so a short run
            needs no flag to fit its warmup).
        schedule: learning rate after warmup: cosine (decay to 10% of the peak at steps) or constant.
        weight_decay: AdamW's decoupled weight decay (not on biases, norms, positions).
        clip_norm: global gradient-norm clipping (0: off).
        eval_every: validate every this many steps (0: only at the end).
        eval_batches: validation batches per periodic evaluation.
        checkpoint_every: save a checkpoint every this many steps.
        keep_checkpoints: checkpoints kept in checkpoints/.
        seed: model initialization and data order.
        profile_steps: FIRST,LAST steps to trace with the TF profiler (TensorBoard); '' for none.
    """
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float | None = None
    warmup_steps: int | None = None
    schedule: Schedule = "cosine"
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    eval_every: int = 200
    eval_batches: int = 50
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0
    profile_steps: str = ""

    def validate(self) -> None:
        check_at_least(self, 1, "steps", "batch_size", "checkpoint_every", "keep_checkpoints")
        check_at_least(self, 0, "warmup_steps", "eval_every", "eval_batches", "weight_decay", "clip_norm",
                       "logical_cpus")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError("learning_rate", self.learning_rate, "must be positive")
        check_choice("schedule", self.schedule, SCHEDULES)
        self.check_devices()
        if self.warmup_steps is not None and self.warmup_steps >= self.steps and self.schedule == "cosine":
            raise ConfigError("warmup_steps", self.warmup_steps,
                              f"leaves no steps to decay over (steps={self.steps}); lower it")
        self.profile_range()

    def warmup(self) -> int:
        """The warmup steps: as given, or `derived_warmup(steps)`."""
        return derived_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps

    def for_model(self, model_config: models.ModelConfig) -> "TrainConfig":
        """This config with a learning rate: as given, or the model's `peak_learning_rate`."""
        if self.learning_rate is not None:
            return self
        return dataclasses.replace(self, learning_rate=peak_learning_rate(model_config))

    def profile_range(self) -> tuple[int, int] | None:
        if not self.profile_steps:
            return None
        try:
            first, last = (int(s) for s in self.profile_steps.split(","))
        except ValueError:
            raise ConfigError("profile_steps", self.profile_steps, "expected FIRST,LAST such as 10,20") from None
        if not 0 < first <= last:
            raise ConfigError("profile_steps", self.profile_steps, "expected 0 < FIRST <= LAST")
        return first, last


def _has_files(path: str) -> bool:
    return any(files for _, _, files in os.walk(path))


def _strategy_name(strategy: tf.distribute.Strategy) -> str:
    return {"_DefaultDistributionStrategy": "default"}.get(type(strategy).__name__, type(strategy).__name__)


# Weights AdamW does not decay: biases, LayerNorm scales and offsets, position embeddings.
NO_WEIGHT_DECAY = ["bias", "gamma", "beta", "positions"]


def warmup_cosine(peak: float, steps: int, warmup_steps: int, final_fraction: float = 0.1):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `final_fraction` x peak
    at `steps` (`final_fraction=1.0`: constant after the warmup)."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, steps - warmup_steps), alpha=final_fraction,
        warmup_target=peak, warmup_steps=warmup_steps)


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


def peak_learning_rate(model_config: models.ModelConfig) -> float:
    """The peak learning rate a model trains at unless told otherwise.

    Measured at the `small` presets (docs/results.md, "Quality"): 3e-3 for the
    transformer at width 128 (2e-3 ended 0.034 bits/char worse), 5e-3 for the
    LSTM at 256 units (2e-3 ended 0.33 worse). A wider transformer takes it
    down in proportion to its width, the rule that meets the published recipes
    at their widths (1e-3 at 384: nanoGPT's Shakespeare model and lmstack's
    `base`; 5e-4 at 768, near GPT-3 Small's 6e-4); the LSTM, untried beyond
    `small`, with the square root of its units (2.5e-3 at `base`'s 1024).
    Narrower models stay at the small preset's rate.
    """
    if isinstance(model_config, models.GPTConfig):
        return 3e-3 * min(1.0, 128 / model_config.d_model)
    return 5e-3 * min(1.0, math.sqrt(256 / model_config.units))


def derived_warmup(steps: int, longest: int = 100) -> int:
    """The warmup a run gets when none is asked for: a tenth of its steps, at most `longest`."""
    return min(longest, steps // 10)


def adamw(learning_rate, weight_decay: float, clip_norm: float, beta_2: float = 0.999):
    """AdamW with decoupled weight decay off `NO_WEIGHT_DECAY` and global-norm clipping (0: none)."""
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay,
                                       global_clipnorm=clip_norm or None, beta_2=beta_2)
    optimizer.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)
    return optimizer


def _learning_rate(config: TrainConfig):
    if config.learning_rate is None:
        raise ValueError("the TrainConfig has no learning rate yet: use config.for_model(model_config)")
    return warmup_cosine(config.learning_rate, config.steps, config.warmup(),
                         0.1 if config.schedule == "cosine" else 1.0)


def compile_for_training(model, config: TrainConfig, steps_per_execution: int = 1):
    """Compiles `model` for training: AdamW and the token cross-entropy (`DerivedMetrics` reports
    perplexity and bits/char from it).

    Call it inside `strategy.scope()` (and after setting the mixed-precision policy).
    """
    optimizer = adamw(_learning_rate(config), config.weight_decay, config.clip_norm, beta_2=0.99)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=config.jit_compile, steps_per_execution=steps_per_execution)
    return model


def build_and_compile(model_config: models.ModelConfig, config: TrainConfig, steps_per_execution: int = 1):
    """A new model, compiled for training (see `compile_for_training`)."""
    return compile_for_training(models.build(model_config), config.for_model(model_config), steps_per_execution)


def steps_per_execution(*intervals: int, longest: int = 16) -> int:
    """Train steps Keras runs per call into TensorFlow: the largest count up to `longest` that divides
    every interval the loop acts on (the run's steps, an epoch, the checkpoint interval, where it starts),
    so callbacks still see each of those steps exactly. One Python round trip per that many steps."""
    common = 0
    for interval in intervals:
        common = math.gcd(common, interval)
    return max(k for k in range(1, longest + 1) if common % k == 0) if common else 1


def tokens_per_char(manifest: dict[str, Any]) -> float:
    """The corpus's tokens per character (train and validation splits together)."""
    splits = manifest["splits"]
    return (splits["train"]["tokens"] + splits["val"]["tokens"]) / max(
        1, splits["train"]["chars"] + splits["val"]["chars"])


def _resumed_model(wd: workdir_lib.Workdir) -> dict[str, Any] | None:
    """The model config (JSON) of the checkpoints in the workdir, if it has any."""
    saved = wd.read_config()
    if "model" not in saved or not os.path.isdir(checkpoints.checkpoint_dir(wd.root)):
        return None
    return saved["model"]


def _check_resume(wd: workdir_lib.Workdir, model_config: models.ModelConfig, config: TrainConfig) -> None:
    old_model = _resumed_model(wd)
    if old_model is None:
        return
    saved = wd.read_config()
    new_model = models.config_to_json(model_config)
    diffs = [f"{k}={old_model.get(k)!r} (now {v!r})" for k, v in new_model.items() if old_model.get(k) != v]
    old_train = saved.get(TRAIN_SECTION, {})
    diffs += [f"{k}={old_train.get(k)!r} (now {getattr(config, k)!r})" for k in RESUME_KEYS
              if k in old_train and old_train[k] != getattr(config, k)]
    if diffs:
        raise UserError(
            f"{wd.root} holds checkpoints trained with other settings: {', '.join(diffs)}; "
            "rerun with the same flags to resume, or use a new --workdir")


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
    config.validate()
    config = config.for_model(model_config)
    wd = workdir_lib.Workdir(workdir)
    manifest = wd.read_manifest()
    vocab = manifest["tokenizer"]["vocab_size"]
    if model_config.vocab_size != vocab:
        raise UserError(f"the model's vocab_size={model_config.vocab_size} differs from the tokenizer's {vocab}")
    dataset.shard_files(wd.root, "val")  # the final evaluation needs it: fail now, not after training

    strategy_lib.split_cpu(config.logical_cpus)
    strategy = strategy_lib.make(config.strategy)
    strategy_lib.check_jit_compile(strategy, config.jit_compile)
    chief = strategy_lib.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
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
                  f"{_strategy_name(strategy)} on {replicas} replica(s), global batch {global_batch} x {seq_len}")
    if config.jit_compile and models.family_of(model_config) == "lstm" and not tf.config.list_physical_devices("GPU"):
        progress.note("note: with --jit_compile, XLA compiles tf_keras's LSTM step again at every step "
                      "(~2.5 s each on CPU, docs/results.md: Training speed); drop --jit_compile for the LSTM")

    if chief:
        checkpoints.save_model_config(wd.root, model_config)
        wd.update_config(TRAIN_SECTION, dataclasses.asdict(config))

    steps_per_epoch = min(config.eval_every or config.steps, config.steps)
    latest = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(wd.root))
    # The profiler traces steps by Keras's batch count, so a traced run goes one step per call.
    per_call = 1 if config.profile_range() else steps_per_execution(
        config.steps, steps_per_epoch, config.checkpoint_every, int(latest.rsplit("-", 1)[1]) if latest else 0)
    with strategy.scope():
        model = build_and_compile(model_config, config, per_call)
    optimizer = model.optimizer

    ckpt_dir = checkpoints.checkpoint_dir(wd.root) if chief else tempfile.mkdtemp(prefix="lmstack-worker-ckpt-")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), ckpt_dir,
                                         max_to_keep=config.keep_checkpoints)
    backup_dir = os.path.join(checkpoints.checkpoint_dir(wd.root), "backup")
    if latest and not _has_files(backup_dir):
        # A finished run (its backup is deleted at the end): continue from its last checkpoint.
        tf.train.Checkpoint(model=model, optimizer=optimizer).restore(latest).expect_partial()
    start = int(optimizer.iterations.numpy())
    if start >= config.steps:
        progress.note(f"{wd.root} is already trained to step {start} (asked for {config.steps}); nothing to do")
        return evaluate.evaluate_model(wd.root, model, model_config, write=chief)

    epochs = math.ceil(config.steps / steps_per_epoch)
    train_ds = dataset.train_dataset(wd.root, seq_len, global_batch, seed=config.seed)
    val_ds = val_steps = None
    if config.eval_every and config.eval_batches:
        val_ds = dataset.val_dataset(wd.root, seq_len, global_batch).take(config.eval_batches)
        # Keras needs the count to run several steps per call; the split may hold fewer batches.
        val_steps = sum(1 for _ in val_ds) or None
        val_ds = val_ds if val_steps else None
    log: dict[str, Any] = {}
    callbacks = [
        callbacks_lib.NaNGuard(),
        callbacks_lib.DerivedMetrics(tokens_per_char(manifest)),
        callbacks_lib.BackupAndRestore(backup_dir, save_freq=config.checkpoint_every // per_call),
        callbacks_lib.Checkpointer(manager, config.checkpoint_every, global_batch * seq_len, progress, log),
        callbacks_lib.StopAtStep(config.steps),
    ]
    if chief:
        profile = config.profile_range() or 0
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(wd.root, "logs"), update_freq=50,
                                                     profile_batch=profile))
    began = time.perf_counter()
    try:
        history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
                            initial_epoch=start // steps_per_epoch, validation_data=val_ds,
                            validation_steps=val_steps,
                            callbacks=callbacks, verbose=verbose)
    finally:
        if not chief:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    wall = time.perf_counter() - began
    summary = evaluate.evaluate_model(wd.root, model, model_config, write=False)
    summary.update({
        "model": models.family_of(model_config), "params": model_config.num_params(),
        "steps": int(optimizer.iterations.numpy()), "global_batch": global_batch, "seq_len": seq_len,
        "replicas": replicas, "strategy": _strategy_name(strategy), "dropout": model_config.dropout,
        "dropout_chosen_because": why,
        "train_loss": float(history.history["loss"][-1]) if history.history.get("loss") else None,
        "tokens_per_s": log.get("tokens_per_s"), "wall_seconds": round(wall, 1),
        "trained_steps_this_run": int(optimizer.iterations.numpy()) - log.get("start_step", start),
    })
    if chief:
        workdir_lib.write_json(wd.root / evaluate.METRICS_FILE, summary)
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
