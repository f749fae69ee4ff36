"""The callbacks of lmstack's training loops: step counting, stopping, NaN guard, checkpoints, metrics.

Every callback here works with `steps_per_execution` > 1: Keras gives a batch
hook the first and the last step of the call it ran, and these count from
those instead of assuming one step per hook.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Iterator

import tensorflow as tf

from models.backend import keras
from pipelines.errors import UserError
from pipelines.progress import Progress


class _QuietSlowCallbackWarning(logging.Filter):
    # Keras warns when per-batch callbacks take longer than a tiny model's step;
    # ours read one loss value per call into TensorFlow (the NaN guard), which is the point.
    def filter(self, record: logging.LogRecord) -> bool:
        return "is slow compared to the batch time" not in record.getMessage()


@contextlib.contextmanager
def quiet_callback_timing() -> Iterator[None]:
    """Around `fit`: without Keras's warning that these callbacks are slow next to a tiny model's step."""
    quiet = _QuietSlowCallbackWarning()
    tf.get_logger().addFilter(quiet)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(quiet)


class DerivedMetrics(keras.callbacks.Callback):
    """Perplexity and bits/char from the loss Keras already averages, for the bar, History and TensorBoard.

    The loss is the mean token cross-entropy (nats), so both are functions of it:
    no metric objects recomputing the cross-entropy inside the train step.

    Args:
        tokens_per_char: the corpus's ratio, for bits per character.
    """

    def __init__(self, tokens_per_char: float = 1.0):
        super().__init__()
        self.tokens_per_char = tokens_per_char

    def _derive(self, logs, prefix=""):
        nats = (logs or {}).get(prefix + "loss")
        if nats is not None:
            logs[prefix + "perplexity"] = math.exp(min(float(nats), 700.0))
            logs[prefix + "bits_per_char"] = float(nats) * self.tokens_per_char / math.log(2.0)

    def on_train_batch_end(self, batch, logs=None):
        self._derive(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._derive(logs)
        self._derive(logs, "val_")


class _StepCounter(keras.callbacks.Callback):
    """Knows the optimizer step without reading the variable: Keras gives each batch hook the first
    and last step of what it ran (more than one with `steps_per_execution`)."""

    step = 0
    _first = 0

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy())  # after BackupAndRestore restored it

    def on_train_batch_begin(self, batch, logs=None):
        self._first = batch

    def on_train_batch_end(self, batch, logs=None):
        self.step += batch - self._first + 1


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's, recording the last step of what a batch hook ran rather than the first.

    A resume starts after the recorded step; Keras records the step a call began at, which with
    `steps_per_execution` > 1 would redo all but one of the steps of the call it backed up after.
    """

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        self._training_state._ckpt_saved_batch.assign(batch)
        super().on_train_batch_end(batch, logs)


class StopAtStep(_StepCounter):
    """Ends `fit` at exactly `steps` optimizer steps, wherever a resume started."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step >= self.steps:
            self.model.stop_training = True


class NaNGuard(_StepCounter):
    """Stops at a non-finite loss before anything saves the broken weights.

    It must come first among the callbacks: raising here skips the savers
    that would run after it for this batch.
    """

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(self.step, float(loss))


class TrainingDiverged(UserError):
    def __init__(self, step: int, loss: float):
        super().__init__(
            f"the loss became {loss} at step {step}; training stopped and the last good checkpoint "
            "is kept; lower --learning_rate, raise --warmup_steps or set --clip_norm, then rerun")
        self.step = step


class Checkpointer(_StepCounter):
    """Saves `ckpt-STEP` every `every` steps and at the end; reports progress and speed."""

    def __init__(self, manager: tf.train.CheckpointManager, every: int, tokens_per_step: int,
                 progress: Progress, log: dict[str, Any]):
        super().__init__()
        self.manager, self.every, self.tokens_per_step = manager, every, tokens_per_step
        self.progress, self.log = progress, log
        self._last_saved = -1
        self._next_save = every
        self._window: list[tuple[float, int]] = []

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        step = self.step
        if step > 0:
            self.progress.note(f"resuming from step {step}")
        self.log["start_step"] = step
        self._next_save = (step // self.every + 1) * self.every
        self._window = [(time.perf_counter(), step)]

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        step = self.step
        now = time.perf_counter()
        self._window = (self._window + [(now, step)])[-21:]
        (t0, s0), (t1, s1) = self._window[0], self._window[-1]
        if t1 > t0 and logs is not None:
            logs["tokens_per_s"] = (s1 - s0) * self.tokens_per_step / (t1 - t0)
            self.log["tokens_per_s"] = logs["tokens_per_s"]
        if step >= self._next_save:  # on the multiple itself unless an execution of several steps spans it
            self._save(step)
            self._next_save = (step // self.every + 1) * self.every

    def on_train_end(self, logs=None):
        self._save(self.step)

    def _save(self, step: int) -> None:
        if step != self._last_saved:
            self.manager.save(checkpoint_number=step)
            self._last_saved = step
