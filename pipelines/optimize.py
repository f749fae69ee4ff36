"""`optimize`: fine-tune a trained model under TF-MOT into a slimmer variant.

    trained checkpoint (or a variant) ─► wrap (prune | qat | prune_qat | cluster)
      ─► fine-tune `steps` on the training split ─► strip the wrappers (prune, cluster)
      ─► evaluate on the validation split ─► WORKDIR/optimized/NAME/

A variant directory has the workdir's layout (config.json with `model` and
`optimization` sections, checkpoints/, logs/, metrics.json), so every later
stage loads it with `--variant=NAME`. It is built in a hidden staging
directory and renamed into place: a failed run leaves nothing behind.

metrics.json holds the variant's validation loss, perplexity and bits/char
next to the same figures of the model it started from (measured in the same
run), non-zero parameters, and the sparsity and distinct values of every
weight matrix (which ones were pruned; for QAT, which layers stay float).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import typing
from typing import Any, Literal

import tensorflow as tf

import models
from models.backend import keras
from pipelines import callbacks as callbacks_lib
from pipelines import checkpoints, dataset, evaluate, fs, mot, train, training
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_at_least, check_choice
from pipelines.progress import Progress

Method = Literal["prune", "qat", "prune_qat", "cluster"]
METHODS = typing.get_args(Method)


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """How to make a variant.

    Attributes:
        method: prune (zero the smallest weights), qat (8-bit quantization-aware training), prune_qat (QAT
            that keeps a pruned variant's zeros) or cluster (each weight matrix shares `clusters` values).
        steps: fine-tuning steps.
        name: the variant's name ('' derives one: pruned50, pruned2by4, qat, pruned50-qat, cluster16).
        from_variant: start from this variant instead of the trained model (prune_qat: a pruned variant;
            default the only one).
        target_sparsity: prune: the fraction of each pruned weight set to zero, in [0, 1).
        schedule: prune: polynomial (a ramp from 0 to the target between begin_step and end_step) or constant.
        begin_step: prune: first pruning step.
        end_step: prune: the step the polynomial schedule reaches the target (0: ~70% of steps).
        frequency: prune: steps between mask updates (0: steps / 20).
        sparsity_m_by_n: prune: M,N keeps M non-zeros in every N weights, e.g. 2,4 ('' for none).
        clusters: cluster: distinct values per clustered weight.
        learning_rate: AdamW's learning rate after a short warmup (fine-tuning: lower than training's).
        batch_size: sequences per batch (0: the run's training batch size).
        grad_accum_steps: batches per optimizer step (their gradients added up: a larger batch in the
            memory of one; 0: the run's training setting).
        overwrite: replace an existing variant of the same name.
        seed: data order.
    """
    method: Method
    steps: int = 300
    name: str = ""
    from_variant: str = ""
    target_sparsity: float = 0.5
    schedule: mot.Schedule = "polynomial"
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 0
    sparsity_m_by_n: str = ""
    clusters: int = 16
    learning_rate: float = 2e-4
    batch_size: int = 0
    grad_accum_steps: int = 0
    overwrite: bool = False
    seed: int = 0

    def validate(self) -> None:
        check_choice("method", self.method, METHODS)
        check_at_least(self, 1, "steps")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ConfigError("target_sparsity", self.target_sparsity, "must be in [0, 1), e.g. 0.5")
        check_choice("schedule", self.schedule, mot.SCHEDULES)
        check_at_least(self, 2, "clusters")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", self.learning_rate, "must be positive")
        for name in ("batch_size", "grad_accum_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must not be negative (0 uses the run's)")
        if self.name and (self.name.startswith(".") or "/" in self.name or self.name != self.name.strip()):
            raise ConfigError("name", self.name, "use a plain directory name such as pruned50")
        self.m_by_n()
        if self.method in ("prune",):
            begin, end, frequency = self.pruning_steps()
            if not 0 <= begin < self.steps:
                raise ConfigError("begin_step", begin, f"must be in [0, steps={self.steps})")
            if self.schedule == "polynomial" and not begin < end < self.steps:
                raise ConfigError("end_step", end, f"must be after begin_step={begin} and before steps={self.steps} "
                                  "so the pruned model is fine-tuned at full sparsity")
            if frequency < 1:
                raise ConfigError("frequency", frequency, "must be at least 1")
            if self.schedule == "polynomial" and (end - begin) % frequency:
                raise ConfigError("end_step", end, f"end_step - begin_step={begin} is not a multiple of "
                                  f"frequency={frequency}, so the target would never be reached; adjust one")

    def m_by_n(self) -> tuple[int, int] | None:
        if not self.sparsity_m_by_n:
            return None
        try:
            m, n = (int(v) for v in self.sparsity_m_by_n.split(","))
        except ValueError:
            raise ConfigError("sparsity_m_by_n", self.sparsity_m_by_n, "expected M,N such as 2,4") from None
        if not 0 < m < n:
            raise ConfigError("sparsity_m_by_n", self.sparsity_m_by_n, "expected 0 < M < N, such as 2,4")
        return m, n

    def pruning_steps(self) -> tuple[int, int, int]:
        """`(begin, end, frequency)` with the defaults filled in."""
        frequency = self.frequency or max(1, self.steps // 20)
        end = self.end_step
        if not end:
            span = max(1, int(0.7 * (self.steps - self.begin_step)) // frequency) * frequency
            end = self.begin_step + span
        return self.begin_step, end, frequency

    def variant_name(self) -> str:
        if self.name:
            return self.name
        if self.method == "prune":
            mn = self.m_by_n()
            return f"pruned{mn[0]}by{mn[1]}" if mn else f"pruned{round(self.target_sparsity * 100)}"
        if self.method == "qat":
            return f"{self.from_variant}-qat" if self.from_variant else "qat"
        if self.method == "prune_qat":
            return f"{self.from_variant or 'pruned'}-qat"
        return f"{self.from_variant + '-' if self.from_variant else ''}cluster{self.clusters}"


def _pruned_variant(root: fs.Path, config: OptimizeConfig) -> str:
    """The pruned variant prune_qat starts from: --from_variant, or the only one there is."""
    if config.from_variant:
        return config.from_variant
    pruned = [v for v in checkpoints.variants(root)
              if (checkpoints.optimization(checkpoints.model_dir(root, v)) or {}).get("method") == "prune"]
    if len(pruned) != 1:
        raise UserError(
            "--method=prune_qat starts from a pruned variant: "
            + ("run `lmstack optimize --method=prune` first" if not pruned
               else f"pick one with --from_variant ({', '.join(pruned)})"))
    return pruned[0]


def _wrap(model: keras.Model, config: OptimizeConfig, log_dir: str) -> tuple[keras.Model, list]:
    """The TF-MOT-wrapped model and the callbacks its training needs."""
    if config.method == "prune":
        begin, end, frequency = config.pruning_steps()
        schedule = mot.pruning_schedule(config.schedule, config.target_sparsity, begin, end, frequency)
        return mot.prune(model, schedule, config.m_by_n()), [
            mot.sparsity.UpdatePruningStep(), mot.sparsity.PruningSummaries(log_dir=log_dir)]
    if config.method in ("qat", "prune_qat"):
        return mot.quantize(model, preserve_sparsity=config.method == "prune_qat"), []
    return mot.cluster(model, config.clusters), []


def _evaluation(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("loss", "perplexity", "bits_per_char", "tokens", "chars")}


def optimize(workdir: str | os.PathLike, config: OptimizeConfig, progress: Progress | None = None,
             verbose: int = 1) -> dict[str, Any]:
    """Makes WORKDIR/optimized/NAME and returns its metrics.

    Raises:
        UserError: bad settings, no trained checkpoint, an unknown or unsuitable source
            variant, an existing variant without `overwrite`, a NaN loss.
    """
    progress = progress or Progress()
    config.validate()
    wd = workdir_lib.Workdir(workdir)
    manifest = wd.read_manifest()
    run_config = wd.read_config()
    from_variant = _pruned_variant(wd.root, config) if config.method == "prune_qat" else config.from_variant
    source = checkpoints.model_dir(wd.root, from_variant)
    made = checkpoints.optimization(source) or {}
    if config.method == "prune_qat" and made.get("method") != "prune":
        raise ConfigError("method", "prune_qat", f"needs a pruned variant; {from_variant!r} was made by "
                          f"method={made.get('method')}; run `lmstack optimize --method=prune` first")
    if made.get("quantized"):
        raise UserError(f"variant {from_variant!r} is quantization-aware already; start from the trained "
                        "model or a pruned or clustered variant")
    config = dataclasses.replace(config, from_variant=from_variant)
    # The training step this fine-tuning continues from (a variant's own steps count after its source's).
    start_step = made.get("start_step", made.get("source_step", 0)) + made["settings"]["steps"] if made else None
    name = config.variant_name()
    final = wd.root / checkpoints.OPTIMIZED_DIR / name
    if final.exists() and not config.overwrite:
        raise UserError(f"variant {name!r} exists ({final}); pass --overwrite to replace it or --name for a new one")
    model, model_config, source_step = checkpoints.load_model(source)  # UserError without a checkpoint
    start_step = source_step if start_step is None else start_step
    source_pruned = []  # what the source variant pruned, for prune_qat's report
    if config.method == "prune_qat":
        source_pruned = [row["weight"] for row in workdir_lib.read_json(source / evaluate.METRICS_FILE)["weights"]
                         if row["pruned"]]

    trained = run_config.get(train.TRAIN_SECTION, {})
    batch_size = config.batch_size or trained.get("batch_size", 32)
    accumulate = config.grad_accum_steps or trained.get("grad_accum_steps", 1)
    train_config = training.TrainConfig(
        steps=config.steps, batch_size=batch_size, grad_accum_steps=accumulate, learning_rate=config.learning_rate,
        warmup_steps=min(50, config.steps // 10), schedule="constant", weight_decay=0.0, seed=config.seed)
    keras.utils.set_random_seed(config.seed)
    progress.note(f"{config.method}: {models.family_of(model_config)} from "
                  f"{('variant ' + from_variant) if from_variant else 'the trained model'} (step {source_step}), "
                  f"{config.steps} fine-tuning steps of {batch_size * accumulate} x {model_config.seq_len} tokens"
                  + (f" ({accumulate} accumulated batches of {batch_size})" if accumulate > 1 else ""))
    progress.note("evaluating the starting model on the validation split")
    baseline = _evaluation(evaluate.evaluate_model(wd.root, model, model_config, write=False))

    with workdir_lib.publish_dir(final, replace=True) as staging:
        summary = _fine_tune(wd, model, model_config, config, train_config, manifest, staging, source_pruned,
                             progress, verbose)
        summary.update({"variant": name, "method": config.method, "from_variant": from_variant or None,
                        "source_step": source_step, "baseline": baseline,
                        "perplexity_change": summary["perplexity"] / baseline["perplexity"] - 1.0,
                        "settings": dataclasses.asdict(config)})
        workdir_lib.write_json(staging / evaluate.METRICS_FILE, summary)
        variant_config = {**run_config, checkpoints.OPTIMIZATION_SECTION: {
            "method": config.method, "from_variant": from_variant or None, "source_step": source_step,
            "start_step": start_step,
            "quantized": config.method in ("qat", "prune_qat"),
            "preserve_sparsity": config.method == "prune_qat", "settings": dataclasses.asdict(config)}}
        workdir_lib.write_json(staging / workdir_lib.CONFIG_FILE, variant_config)
    summary["path"] = str(final)
    return summary


def _fine_tune(wd, model, model_config, config: OptimizeConfig, train_config: training.TrainConfig,
               manifest, staging: fs.Path, source_pruned: list[str], progress: Progress,
               verbose: int) -> dict[str, Any]:
    log_dir = str(staging / "logs")
    wrapped, extra_callbacks = _wrap(model, config, log_dir)
    pruned_names = mot.pruned_weight_names(wrapped) or source_pruned
    frozen = mot.freeze_uncovered(wrapped, source_pruned) if config.method == "prune_qat" else []
    # One step per call: TF-MOT's pruning callbacks update the pruning step before every batch.
    training.compile_for_training(wrapped, train_config, steps_per_execution=1)
    train_ds = dataset.train_dataset(wd.root, model_config.seq_len,
                                     train_config.batch_size * train_config.grad_accum_steps, seed=config.seed)
    callbacks = [callbacks_lib.NaNGuard(), callbacks_lib.DerivedMetrics(training.tokens_per_char(manifest)),
                 callbacks_lib.StopAtStep(config.steps), *extra_callbacks,
                 keras.callbacks.TensorBoard(log_dir, update_freq=max(1, config.steps // 50))]
    began = time.perf_counter()
    per_epoch = math.ceil(config.steps / 10)  # Keras "epochs" here are progress lines, not passes over the data
    with callbacks_lib.quiet_callback_timing():
        history = wrapped.fit(train_ds, epochs=math.ceil(config.steps / per_epoch), steps_per_epoch=per_epoch,
                              callbacks=callbacks, verbose=verbose)
    wall = time.perf_counter() - began

    final = mot.strip(wrapped)  # QAT wrappers stay: they hold the learned ranges
    left = mot.wrappers(final)
    if config.method in ("prune", "cluster") and left:
        raise RuntimeError(f"TF-MOT wrappers left after stripping: {left}")
    checkpoints.manager(staging, tf.train.Checkpoint(model=final), max_to_keep=1).save(checkpoint_number=config.steps)
    progress.note("evaluating the variant on the validation split")
    result = _evaluation(evaluate.evaluate_model(wd.root, final, model_config, write=False))
    weights = mot.weight_report(final)
    quantized = config.method in ("qat", "prune_qat")
    for row in weights:
        row["pruned"] = row["weight"] in pruned_names
    nonzero, total = mot.count_nonzero(final)
    pruned = [row for row in weights if row["pruned"]]
    result.update({
        "family": models.family_of(model_config), "steps": config.steps,
        "train_loss": float(history.history["loss"][-1]),
        "wall_seconds": round(wall, 1),
        "tokens_per_s": config.steps * train_config.batch_size * train_config.grad_accum_steps
        * model_config.seq_len / wall,
        "params": total, "nonzero_params": nonzero,
        "sparsity": (1.0 - sum(r["nonzero"] for r in pruned) / sum(r["size"] for r in pruned)) if pruned else 0.0,
        "weights": weights,
    })
    if quantized:
        result["float_layers"] = mot.float_layers(final)
        result["frozen_layers"] = frozen
    return result


def describe(summary: dict[str, Any]) -> str:
    """The end-of-optimization summary, for people."""
    base = summary["baseline"]
    lines = [
        f"{summary['method']} -> variant {summary['variant']} ({summary['path']}) in {summary['wall_seconds']} s",
        f"validation perplexity {summary['perplexity']:.3f} (from {base['perplexity']:.3f}, "
        f"{summary['perplexity_change']:+.1%}), {summary['bits_per_char']:.3f} bits/char "
        f"(from {base['bits_per_char']:.3f})",
        f"non-zero parameters {summary['nonzero_params']:,} of {summary['params']:,}"
        + (f"; sparsity of the pruned weights {summary['sparsity']:.1%}" if summary["sparsity"] else ""),
    ]
    rows = [r for r in summary["weights"] if r["pruned"] or summary["method"] != "prune"]
    width = max((len(r["weight"]) for r in rows), default=10)
    lines.append(f"{'weight'.ljust(width)}  {'shape':>12}  {'sparsity':>8}  {'distinct':>8}")
    lines += [f"{r['weight'].ljust(width)}  {'x'.join(map(str, r['shape'])):>12}  {r['sparsity']:8.1%}  "
              f"{r['distinct']:8,}" for r in rows]
    if summary.get("float_layers"):
        lines.append(f"float (not quantized by TF-MOT's 8-bit scheme): {', '.join(summary['float_layers'])}")
    if summary.get("frozen_layers"):
        lines.append(f"frozen to keep their pruned zeros (float, outside the scheme): "
                     f"{', '.join(summary['frozen_layers'])}")
    lines.append(f"use it: lmstack evaluate|generate|export --workdir=... --variant={summary['variant']}")
    return "\n".join(lines)
