"""Choosing a tf.distribute strategy: TensorFlow's own engines, nothing home-made.

- `default`: one device.
- `mirrored`: `MirroredStrategy` over every local GPU (or, without GPUs, over
  the logical CPU devices made by `split_cpu`, which is how it is tested).
- `multi_worker`: `MultiWorkerMirroredStrategy`, configured by `TF_CONFIG`
  (what Kubeflow's TFJob and `lmstack launch` set).
- `auto`: multi_worker if TF_CONFIG names more than one worker, mirrored if
  there is more than one GPU, else default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Literal

import tensorflow as tf

from pipelines.errors import ConfigError, UserError, check_choice

Strategy = Literal["auto", "default", "mirrored", "multi_worker"]
STRATEGIES = typing.get_args(Strategy)
Precision = Literal["none", "bf16", "fp16"]
# --mixed_precision -> the Keras policy.
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where a training job runs: the settings `train` and `finetune` share, with one meaning.

    Attributes:
        strategy: the tf.distribute strategy: auto (multi_worker under a TF_CONFIG of several workers,
            mirrored with several GPUs, else default), default (one device), mirrored, multi_worker.
        logical_cpus: split the CPU into this many devices (to run mirrored without GPUs).
        mixed_precision: compute precision: none (float32), bf16 or fp16 (variables stay float32).
        jit_compile: XLA-compile the train step (one replica or GPUs).
    """
    strategy: Strategy = "auto"
    logical_cpus: int = 0
    mixed_precision: Precision = "none"
    jit_compile: bool = False

    def check_devices(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)


def split_cpu(count: int) -> None:
    """Makes `count` logical CPU devices (before TensorFlow initializes its devices)."""
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as e:  # devices already initialized: only an error if the split differs
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UserError(f"cannot split the CPU into {count} devices now: {e}") from None


def tf_config() -> dict[str, Any] | None:
    """The parsed TF_CONFIG, or None when it is unset.

    Raises:
        UserError: TF_CONFIG is not JSON with a cluster and a task.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
        if not isinstance(workers, list) or not workers or task["type"] not in config["cluster"]:
            raise ValueError("no workers, or a task type that is not in the cluster")
        int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"TF_CONFIG is malformed ({e}); expected JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None
    return config


def make(name: str) -> tf.distribute.Strategy:
    """Builds the strategy `name` (one of STRATEGIES).

    Raises:
        UserError: an unknown name, or multi_worker without TF_CONFIG.
    """
    check_choice("strategy", name, STRATEGIES)
    cluster = tf_config()
    if name == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if cluster and len(cluster["cluster"].get("worker", [])) > 1:
            name = "multi_worker"
        elif len(gpus) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if cluster is None:
        raise ConfigError("strategy", name, "needs TF_CONFIG; start the workers with "
                          "`lmstack launch --workers=N -- train ...` or set TF_CONFIG yourself")
    return tf.distribute.MultiWorkerMirroredStrategy()


def check_jit_compile(strategy: tf.distribute.Strategy, jit_compile: bool) -> None:
    """Refuses XLA for a strategy whose replicas are CPU devices (more than one).

    XLA compiles the whole train step, the gradients' all-reduce included, and
    its CPU backend has no cross-device collectives: MirroredStrategy over
    logical CPUs fails on a variable of another device, MultiWorkerMirrored on
    CPU hosts with "Collectives are not yet implemented for CPU devices".
    On GPUs both work.

    Raises:
        UserError: `jit_compile` with more than one replica and no GPU.
    """
    replicas = strategy.num_replicas_in_sync
    if jit_compile and replicas > 1 and not tf.config.list_physical_devices("GPU"):
        raise ConfigError("jit_compile", True, f"cannot train {replicas} replicas on CPU devices (XLA on CPU has "
                          "no cross-device all-reduce); drop it, or train on one replica or on GPUs")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes checkpoints and artifacts (worker 0 when there is no chief task)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()
