"""The training toolkit the `train`, `finetune` and `optimize` stages share.

`TrainConfig` (how to train), the optimizer (AdamW off biases, norms and
positions, global-norm clipping), the learning-rate schedule (linear warmup,
cosine decay), the defaults derived from the model and the run (peak
learning rate, warmup), and compiling a model for training. Stages decide
what to train and where it goes; this module only says how a step is taken.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

import tensorflow as tf

import models
from models import lora
from models.backend import keras
from pipelines import strategy as strategy_lib
from pipelines.errors import ConfigError, check_at_least, check_choice

Schedule = Literal["cosine", "constant"]
SCHEDULES = typing.get_args(Schedule)


@dataclasses.dataclass(frozen=True)
class TrainConfig(strategy_lib.Devices):
    """How to train (and, from `Devices`, where: strategy, logical_cpus, mixed_precision, jit_compile).

    Attributes:
        steps: optimizer steps in all (a rerun with more steps continues).
        epochs: train this many passes over the training windows instead of `steps` (None: use steps).
        batch_size: sequences per replica; the global batch is this x replicas.
        grad_accum_steps: batches per optimizer step: each step adds up the gradients of this many
            batches before one update, the update of one batch this many times larger in the memory
            of one (a step then reads batch_size x replicas x grad_accum_steps sequences).
        learning_rate: peak learning rate, reached after warmup_steps (default: the model's own,
            `peak_learning_rate`: 3e-3 for the small transformer, 5e-3 for the small LSTM, lower for
            wider models; a tenth of it for an imported pre-trained model).
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
        data_service: grpc://HOST:PORT of a tf.data service dispatcher (`lmstack data-service`): its
            workers prepare the training batches ('': this process does).
    """
    steps: int = 1000
    epochs: int | None = None
    batch_size: int = 32
    grad_accum_steps: int = 1
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
    data_service: str = ""

    def validate(self) -> None:
        check_at_least(self, 1, "steps", "epochs", "batch_size", "grad_accum_steps", "checkpoint_every",
                       "keep_checkpoints")
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

    def for_data(self, train_tokens: int, seq_len: int) -> "TrainConfig":
        """This config with `steps` from `epochs`, if given: passes over the training split's windows of
        `seq_len` + 1 tokens, `batch_size` windows a step."""
        if self.epochs is None:
            return self
        windows = train_tokens // (seq_len + 1)
        config = dataclasses.replace(self, steps=max(1, self.epochs * windows // self.batch_size))
        config.validate()
        return config

    def for_model(self, model_config: models.ModelConfig, pretrained: bool = False) -> "TrainConfig":
        """This config with a learning rate: as given, or the model's `peak_learning_rate`.

        A run that starts from pre-trained weights (`lmstack import`) continues at a tenth of it:
        5e-5 for GPT-2 small's width, Hugging Face's default for fine-tuning it (`run_clm`). LoRA
        adapters, which start from nothing, train at the full rate (the LoRA paper's and PEFT's
        recipes put LoRA's rate about ten times full fine-tuning's).
        """
        if self.learning_rate is not None:
            return self
        tenth = pretrained and not getattr(model_config, "lora_rank", 0)
        return dataclasses.replace(self, learning_rate=peak_learning_rate(model_config) / (10 if tenth else 1))

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


# Weights AdamW does not decay: biases, LayerNorm scales and offsets, position embeddings.
NO_WEIGHT_DECAY = ["bias", "gamma", "beta", "scale", "positions"]  # LayerNorm gamma/beta, RMSNorm scale


def warmup_cosine(peak: float, steps: int, warmup_steps: int, final_fraction: float = 0.1):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `final_fraction` x peak
    at `steps` (`final_fraction=1.0`: constant after the warmup)."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, steps - warmup_steps), alpha=final_fraction,
        warmup_target=peak, warmup_steps=warmup_steps)


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
    return accumulate_gradients(model, config.grad_accum_steps)


def accumulate_gradients(model, micro_batches: int):
    """Makes each `fit` step of a compiled model one optimizer step over `micro_batches` batches.

    The step's batch (`micro_batches` times the per-replica batch) is cut into
    `micro_batches` equal parts; a `tf.while_loop` runs forward and backward on
    one part at a time and adds up the gradients of the mean loss / micro_batches,
    so the update equals the one for the whole batch while activations are held
    for one part only. Everything else stays one step: the optimizer's
    iterations, the learning-rate schedule, checkpoints and callbacks. Under a
    strategy, each replica accumulates its own parts and `apply_gradients`
    all-reduces once per step. The loss metric averages the parts' losses.

    Replacing `train_step` on the instance (not subclassing) works on any
    compiled model: functional models and TF-MOT's wrapped clones alike.

    Args:
        model: a compiled tf_keras model whose data yields `(inputs, targets)`.
        micro_batches: parts per step (1: `model` is returned unchanged).
    """
    if micro_batches <= 1:
        return model

    def train_step(data):
        x, y = data  # (N * b, ...) each
        parts = lambda t: tf.reshape(t, tf.concat([[micro_batches, -1], tf.shape(t)[1:]], 0))
        xs, ys = parts(x), parts(y)  # (N, b, ...)
        variables = model.trainable_variables
        optimizer = model.optimizer
        scaled = isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)  # float16: loss scaling

        def body(i, sums):
            with tf.GradientTape() as tape:
                y_pred = model(xs[i], training=True)
                loss = model.compute_loss(xs[i], ys[i], y_pred) / micro_batches
                if scaled:
                    loss = optimizer.get_scaled_loss(loss)
            grads = tape.gradient(loss, variables)
            if scaled:
                grads = optimizer.get_unscaled_gradients(grads)
            # Update only: reading a metric is a cross-replica sync, which control flow may not hold.
            model.compiled_metrics.update_state(ys[i], y_pred)
            return i + 1, [s if g is None else s + tf.cast(g, s.dtype) for s, g in zip(sums, grads)]

        zeros = [tf.zeros_like(v) for v in variables]
        _, sums = tf.while_loop(lambda i, _: i < micro_batches, body, (tf.constant(0), zeros))
        optimizer.apply_gradients(zip(sums, variables))
        return model.get_metrics_result()

    model.train_step = train_step
    return model


def build_and_compile(model_config: models.ModelConfig, config: TrainConfig, steps_per_execution: int = 1):
    """A new model, compiled for training (see `compile_for_training`); with LoRA adapters
    (`lora_rank`), only they train."""
    model = models.build(model_config)
    if getattr(model_config, "lora_rank", 0):
        lora.freeze_all_but_adapters(model)
    return compile_for_training(model, config.for_model(model_config), steps_per_execution)


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
