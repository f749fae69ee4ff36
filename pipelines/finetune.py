"""`finetune`: a pre-trained language model run -> a text classifier (transfer learning).

    BASE (trained LM workdir) ─► tokenizer + backbone weights
    labelled CSV / JSONL ─► train / validation examples, classes discovered
      ─► classifier (backbone + pooling + Dense head; `models.classifier`)
      ─► fit under a tf.distribute strategy, backbone frozen, partly frozen or not,
         optionally unfrozen after `unfreeze_at` steps at a lower learning rate
      ─► accuracy, per-class precision / recall / F1, confusion matrix ─► CLS/

This module is the driver (settings, checks on the base, freezing, the fit
phases); the classifier workdir it writes - its layout, loading, examples,
predictions - is `pipelines.classifiers`, and its metrics are
`evaluate.evaluate_classifier`. With `baseline`, CLS/baseline/ holds the same
classifier trained from scratch (a classifier workdir too).

CLS is published whole (`workdir.publish_dir`), so a failed run leaves
nothing behind. Under MultiWorkerMirroredStrategy only the chief publishes;
the other workers build theirs in temporary directories.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import typing
from typing import Any, Literal

import numpy as np
import tensorflow as tf

import models
from models import lora
from models import classifier as classifier_lib
from models.backend import keras
from pipelines import callbacks as callbacks_lib
from pipelines import checkpoints, classifiers, evaluate, fs, labelled, tokenizers, training
from pipelines import strategy as strategy_lib
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_at_least, check_choice
from pipelines.progress import Progress

CLASSIFIER_SECTION = checkpoints.CLASSIFIER_SECTION
FINETUNE_SECTION = "finetune"
BASELINE_DIR = "baseline"
Init = Literal["pretrained", "scratch"]
INITS = typing.get_args(Init)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(strategy_lib.Devices):
    """How to make a classifier (and, from `Devices`, where to train it).

    Attributes:
        base: a language-model workdir trained by `lmstack train` (its tokenizer, architecture and weights).
        train: labelled examples: .csv or .jsonl, optionally .gz / .bz2.
        text_column: the column (JSON key) holding the text.
        label_column: the column (JSON key) holding the label.
        val: labelled validation examples ('' holds out val_fraction of train).
        val_fraction: held out of train per class when val is not given.
        freeze: all (train the head only), none, or N (the embeddings and the bottom N blocks / layers).
        unfreeze_at: after this many steps unfreeze everything and go on at unfreeze_learning_rate (0: never).
        unfreeze_learning_rate: learning rate after unfreezing (0: learning_rate / 10).
        pooling: mean (over the text's tokens) or last (the final token's state); see models.classifier.
        init: the backbone's weights: pretrained (the base's) or scratch (the same network, random).
        baseline: also train the same network from scratch into CLS/baseline/ and compare.
        model: the model family the base must hold (lstm | transformer; '' accepts any).
        tokenizer: the tokenizer kind the base must use (char | byte | wordpiece | sentencepiece | bpe; '' any).
        steps: optimizer steps.
        batch_size: examples per replica and batch.
        grad_accum_steps: batches per optimizer step (their gradients added up: a larger batch in the
            memory of one).
        learning_rate: peak learning rate (warmup, then cosine decay).
        warmup_steps: linear warmup steps (default: a tenth of steps, at most 50).
        weight_decay: AdamW's decoupled weight decay.
        clip_norm: global gradient-norm clipping (0: off).
        dropout: before the head.
        max_length: tokens read per text (0: the base's seq_len).
        eval_every: validate every this many steps (0: only at the end).
        lora_rank: train LoRA adapters of this rank on the base transformer's projections, and the head,
            instead of the whole backbone (0: no adapters); see `lmstack train --lora_rank`.
        lora_alpha: the adapters' update is scaled by lora_alpha / lora_rank (default: lora_rank).
        lora_targets: the projections adapted: attention, mlp, or single ones (query, key, value,
            attention_output, mlp_gate, mlp_in, mlp_out).
        overwrite: replace an existing classifier workdir.
        seed: split, initialization and data order.
    """
    base: str
    train: str
    text_column: str = "text"
    label_column: str = "label"
    val: str = ""
    val_fraction: float = 0.1
    freeze: str = "none"
    unfreeze_at: int = 0
    unfreeze_learning_rate: float = 0.0
    pooling: Literal["mean", "last"] = "mean"
    init: Init = "pretrained"
    baseline: bool = False
    model: str = ""
    tokenizer: str = ""
    steps: int = 500
    batch_size: int = 32
    grad_accum_steps: int = 1
    learning_rate: float = 5e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    dropout: float = 0.1
    max_length: int = 0
    eval_every: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("attention", "mlp")
    overwrite: bool = False
    seed: int = 0

    def validate(self) -> None:
        for name in ("base", "train"):
            if not getattr(self, name):
                raise ConfigError(name, "", "is required: name a path")
        check_at_least(self, 1, "steps", "batch_size", "grad_accum_steps")
        check_at_least(self, 0, "warmup_steps", "weight_decay", "clip_norm", "unfreeze_at", "unfreeze_learning_rate",
                       "max_length", "eval_every", "logical_cpus")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", self.learning_rate, "must be positive")
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ConfigError("warmup_steps", self.warmup_steps, f"must be below steps={self.steps}")
        check_choice("pooling", self.pooling, classifier_lib.POOLINGS)
        check_choice("init", self.init, INITS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "expected a fraction in [0, 1)")
        if self.model:
            check_choice("model", self.model, models.FAMILIES)
        if self.tokenizer:
            check_choice("tokenizer", self.tokenizer, tokenizers.KINDS)
        self.frozen_layers_count(None)
        if self.unfreeze_at and self.freeze == "none":
            raise ConfigError("unfreeze_at", self.unfreeze_at, "needs a frozen start; set freeze to all or N")
        if self.unfreeze_at and self.unfreeze_at >= self.steps:
            raise ConfigError("unfreeze_at", self.unfreeze_at, f"must be below steps={self.steps}")
        if self.init == "scratch" and self.freeze != "none":
            raise ConfigError("freeze", self.freeze, "with init=scratch would freeze random weights; use none")
        check_at_least(self, 0, "lora_rank")
        if self.lora_rank:
            if self.freeze != "none" or self.init != "pretrained":
                raise ConfigError("lora_rank", self.lora_rank, "trains adapters on the pre-trained backbone, which "
                                  "it freezes; drop freeze and init")
            if self.lora_alpha is not None and self.lora_alpha <= 0:
                raise ConfigError("lora_alpha", self.lora_alpha, "must be positive")
            try:
                lora.projections(self.lora_targets)
            except ValueError as e:
                raise ConfigError("lora_targets", ",".join(self.lora_targets), str(e).split(": ", 1)[1]) from None
        self.check_devices()

    def frozen_layers_count(self, layers: int | None) -> int | str:
        """'all', or how many bottom blocks to freeze (0 = none)."""
        if self.freeze in ("all", "none"):
            return "all" if self.freeze == "all" else 0
        try:
            count = int(self.freeze)
        except ValueError:
            raise ConfigError("freeze", self.freeze, "expected all, none or a number of bottom layers") from None
        if count < 0 or (layers is not None and count > layers):
            raise ConfigError("freeze", self.freeze, "expected 0.." + (f"{layers} (the base has {layers} layers)"
                                                                         if layers is not None else "N"))
        return count


# ---------------------------------------------------------------------------
# Fine-tuning


def _check_base(config: FinetuneConfig) -> tuple[fs.Path, models.ModelConfig, dict[str, Any]]:
    """The base run's root, model config and tokenizer config, checked against what the user expects."""
    base = workdir_lib.Workdir(config.base)
    if not base.root.is_dir():
        raise ConfigError("base", config.base, "no such directory; pass a workdir trained by `lmstack train`")
    if checkpoints.classifier_section(base.root) is not None:
        raise ConfigError("base", config.base, "is a classifier workdir; pass the language-model run it came from")
    base.read_config()  # UserError if not a prepared workdir
    # A base trained with LoRA adapters is loaded merged (`checkpoints.load_model`): its plain shape.
    model_config = lora.plain_config(checkpoints.read_model_config(base.root))  # UserError if never trained
    if tf.train.latest_checkpoint(checkpoints.checkpoint_dir(base.root)) is None:
        raise ConfigError("base", config.base, f"has no checkpoint; run `lmstack train --workdir={config.base}` first")
    tokenizer_config = tokenizers.load_config(base.tokenizer_dir)
    family = models.family_of(model_config)
    if config.model and config.model != family:
        raise ConfigError("base", config.base, f"holds a {family} model, but model={config.model} was asked for; "
                          "pass another base or drop model")
    if config.tokenizer and config.tokenizer != tokenizer_config["kind"]:
        raise ConfigError("base", config.base, f"uses the {tokenizer_config['kind']} tokenizer, but "
                          f"tokenizer={config.tokenizer} was asked for; pass another base or drop tokenizer")
    return base.root, model_config, tokenizer_config


def _freeze(model: keras.Model, config: classifier_lib.ClassifierConfig, frozen: int | str) -> list[str]:
    """Marks frozen layers not trainable; returns their names."""
    backbone = model.get_layer("backbone")
    if frozen == "all":
        backbone.trainable = False
        return [layer.name for layer in backbone.layers if layer.weights]
    names = classifier_lib.bottom_layers(config.backbone, frozen) if frozen else []
    for name in names:
        backbone.get_layer(name).trainable = False
    return [n for n in names if backbone.get_layer(n).weights]


def _compile(model, config: FinetuneConfig, learning_rate: float, steps: int, warmup: int) -> None:
    optimizer = training.adamw(training.warmup_cosine(learning_rate, steps, warmup), config.weight_decay,
                            config.clip_norm)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=config.jit_compile)
    training.accumulate_gradients(model, config.grad_accum_steps)


def finetune(workdir: str | os.PathLike, config: FinetuneConfig, progress: Progress | None = None,
             verbose: int = 1) -> dict[str, Any]:
    """Makes the classifier workdir (and its from-scratch baseline if asked) and returns its metrics.

    Raises:
        UserError: bad settings, a base run that is not a trained LM (or not the expected one),
            unreadable examples, unknown columns, one class only, an existing workdir without `overwrite`.
    """
    progress = progress or Progress()
    config.validate()
    # Before any TensorFlow op (the tokenizer's): devices and collective ops are fixed at startup.
    strategy_lib.split_cpu(config.logical_cpus)
    strategy = strategy_lib.make(config.strategy)
    strategy_lib.check_jit_compile(strategy, config.jit_compile)
    chief = strategy_lib.is_chief(strategy)
    final = fs.path(workdir)
    if final.exists() and not config.overwrite:
        raise UserError(f"{final} exists; pass --overwrite to replace it or choose another --workdir")
    if final.exists() and not (final / workdir_lib.CONFIG_FILE).is_file() and any(final.iterdir()):
        raise UserError(f"{final} is a non-empty directory that is not an lmstack workdir; choose another --workdir")
    base_root, lm_config, tokenizer_config = _check_base(config)
    if config.lora_rank and not isinstance(lm_config, models.GPTConfig):
        raise ConfigError("lora_rank", config.lora_rank, f"adapts a transformer's projections; {config.base} holds "
                          f"an {models.family_of(lm_config)}")
    frozen = config.frozen_layers_count(lm_config.layers)
    context = lm_config.seq_len if models.family_of(lm_config) == "transformer" else None
    max_length = config.max_length or lm_config.seq_len
    if context is not None and max_length > context:
        raise ConfigError("max_length", max_length, f"is beyond the base transformer's context of {context}")
    if max_length < 2:
        raise ConfigError("max_length", max_length, "must be at least 2")

    examples = labelled.read(config.train, config.text_column, config.label_column)
    classes = labelled.label_set(examples)
    if config.val:
        train_examples = examples
        val_examples = labelled.read(config.val, config.text_column, config.label_column)
    else:
        train_examples, val_examples = labelled.split(examples, config.val_fraction, config.seed)
    unknown = sorted(set(val_examples.labels) - set(classes))
    if unknown:
        raise UserError(f"{config.val}: labels {unknown} do not occur in --train={config.train}; "
                        f"the classifier knows {classes}")
    tokenizer = tokenizers.load(base_root / workdir_lib.TOKENIZER_DIR)
    progress.note(f"{len(train_examples):,} training and {len(val_examples):,} validation examples, "
                  f"classes {', '.join(classes)}; {models.family_of(lm_config)} backbone from {base_root} "
                  f"({config.init}), {max_length} tokens per text")

    # Every worker builds; only the chief's build is published.
    with workdir_lib.publish_dir(final, replace=True, scratch=not chief) as staging:
        summary = _build(staging, config, strategy, base_root, lm_config, tokenizer_config, tokenizer, classes,
                         train_examples, val_examples, frozen, max_length, progress, verbose)
        if config.baseline and config.init == "pretrained":
            progress.note("baseline: the same classifier trained from scratch (no pre-training)")
            scratch = dataclasses.replace(config, init="scratch", freeze="none", unfreeze_at=0, baseline=False,
                                          lora_rank=0)
            baseline = _build(staging / BASELINE_DIR, scratch, strategy, base_root, lm_config, tokenizer_config,
                              tokenizer, classes, train_examples, val_examples, 0, max_length, progress, verbose)
            summary["baseline"] = {k: baseline[k] for k in ("accuracy", "macro_f1", "per_class", "confusion",
                                                            "wall_seconds")}
            summary["accuracy_gain"] = summary["accuracy"] - baseline["accuracy"]
            workdir_lib.write_json(staging / "metrics.json", summary)
    summary["path"] = str(final)
    return summary


def _build(root: fs.Path, config: FinetuneConfig, strategy, base_root: fs.Path, lm_config,
           tokenizer_config, tokenizer, classes: list[str], train_examples: labelled.Examples,
           val_examples: labelled.Examples, frozen: int | str, max_length: int, progress: Progress,
           verbose: int) -> dict[str, Any]:
    """Writes one classifier workdir at `root` and returns its metrics."""
    root.mkdir(parents=True, exist_ok=True)
    (root / workdir_lib.TOKENIZER_DIR).mkdir()
    for path in (base_root / workdir_lib.TOKENIZER_DIR).iterdir():
        if path.is_file() and not path.name.startswith("."):
            fs.copy_file(path, root / workdir_lib.TOKENIZER_DIR / path.name)
    data = root / workdir_lib.DATA_DIR
    data.mkdir()
    for split, examples in (("train", train_examples), ("val", val_examples)):
        classifiers.write_split(data / classifiers.SPLIT_FILES[split], examples)
    counts = {split: {label: ex.labels.count(label) for label in classes}
              for split, ex in (("train", train_examples), ("val", val_examples))}
    workdir_lib.write_json(data / workdir_lib.MANIFEST_FILE, {
        "kind": "classifier", "labels": classes, "text_column": config.text_column,
        "label_column": config.label_column, "tokenizer": tokenizer_config,
        "splits": {split: {"file": classifiers.SPLIT_FILES[split], "examples": sum(counts[split].values()),
                           "per_class": counts[split], "source": ex.source}
                   for split, ex in (("train", train_examples), ("val", val_examples))}})

    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas * config.grad_accum_steps  # examples per optimizer step
    keras.mixed_precision.set_global_policy(strategy_lib.PRECISIONS[config.mixed_precision])
    keras.utils.set_random_seed(config.seed)
    base_step = None
    with strategy.scope():
        if config.init == "pretrained":
            lm, _, base_step = checkpoints.load_model(base_root)
            if config.lora_rank:  # the base's weights under new adapters
                lm, lm_config = lora.adapt(lm, lm_config, config.lora_rank, config.lora_alpha, config.lora_targets)
        else:
            lm = models.build(lm_config)
        cls_config = classifier_lib.ClassifierConfig(lm_config, len(classes), config.pooling, config.dropout,
                                                     max_length)
        model = classifier_lib.build_classifier(cls_config, lm)
        frozen_names = _freeze(model, cls_config, frozen)
        if config.lora_rank:
            lora.freeze_all_but_adapters(model.get_layer("backbone"))
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    progress.note(f"classifier: {total:,} parameters, {trainable:,} trainable"
                  + (f" (frozen: {'the whole backbone' if frozen == 'all' else f'embeddings + {frozen} bottom layers'})"
                     if frozen else "")
                  + (f" (the backbone's LoRA adapters of rank {config.lora_rank} and the head)" if config.lora_rank
                     else "") + f"; {replicas} replica(s), global batch {global_batch}")
    workdir_lib.write_json(root / workdir_lib.CONFIG_FILE, {
        CLASSIFIER_SECTION: classifiers.config_to_json(cls_config, classes),
        FINETUNE_SECTION: dataclasses.asdict(config),
        "base": {"workdir": str(base_root), "step": base_step, "init": config.init,
                 "model": models.config_to_json(lm_config)},
        "tokenizer": tokenizer_config,
    })

    label_index = {label: i for i, label in enumerate(classes)}
    y_train = np.array([label_index[label] for label in train_examples.labels])
    y_val = np.array([label_index[label] for label in val_examples.labels])
    train_ds = classifiers.dataset(tokenizer, train_examples.texts, y_train, max_length, global_batch, config.seed)
    val_batch = global_batch // config.grad_accum_steps  # evaluation needs no accumulation
    val_ds = classifiers.dataset(tokenizer, val_examples.texts, y_val, max_length, val_batch, None)
    log_dir = root / "logs"
    warmup = training.derived_warmup(config.steps, 50) if config.warmup_steps is None else config.warmup_steps
    phases = [(0, config.unfreeze_at or config.steps, config.learning_rate, warmup)]
    if config.unfreeze_at:
        phases.append((config.unfreeze_at, config.steps,
                       config.unfreeze_learning_rate or config.learning_rate / 10, min(warmup, 20)))
    began, history = time.perf_counter(), {}
    for i, (start, end, learning_rate, warmup) in enumerate(phases):
        if i:
            progress.note(f"step {start}: unfreezing the backbone, learning rate {learning_rate:g}")
            with strategy.scope():
                model.get_layer("backbone").trainable = True
                for layer in model.get_layer("backbone").layers:
                    layer.trainable = True
        with strategy.scope():
            _compile(model, config, learning_rate, end - start, min(warmup, max(0, end - start - 1)))
        every = min(config.eval_every or (end - start), end - start)
        with callbacks_lib.quiet_callback_timing():
            fitted = model.fit(train_ds, epochs=math.ceil((end - start) / every), steps_per_epoch=every,
                               validation_data=val_ds, verbose=verbose, callbacks=[
                                   callbacks_lib.NaNGuard(), callbacks_lib.StopAtStep(end - start),
                                   keras.callbacks.TensorBoard(str(log_dir / f"phase{i}"), update_freq=10)])
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(values)
    wall = time.perf_counter() - began
    checkpoints.manager(root, tf.train.Checkpoint(model=model), max_to_keep=1).save(checkpoint_number=config.steps)

    probabilities = classifiers.predict_ids(model, tokenizer, val_examples.texts, max_length)
    summary = evaluate.classification_metrics(classes, y_val, probabilities.argmax(axis=1))
    summary.update({
        "split": "validation", "init": config.init, "freeze": config.freeze, "frozen_layers": frozen_names,
        "unfreeze_at": config.unfreeze_at or None, "family": models.family_of(lm_config),
        "params": total, "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "trainable_params_at_start": trainable, "steps": config.steps, "global_batch": global_batch,
        "train_loss": float(history["loss"][-1]), "train_accuracy": float(history["accuracy"][-1]),
        "wall_seconds": round(wall, 1), "examples_per_s": config.steps * global_batch / wall,
        "majority_class_accuracy": float(np.bincount(y_val, minlength=len(classes)).max() / max(1, len(y_val))),
    })
    workdir_lib.write_json(root / "metrics.json", summary)
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The end-of-fine-tuning summary, for people."""
    lines = [f"classifier ({summary['family']} backbone, {summary['init']}, freeze={summary['freeze']}) "
             f"trained {summary['steps']} steps in {summary['wall_seconds']} s -> {summary['path']}",
             evaluate.describe_classifier(summary)]
    if "baseline" in summary:
        lines.append(f"from scratch (same network, no pre-training): accuracy {summary['baseline']['accuracy']:.1%}; "
                     f"pre-training {summary['accuracy_gain']:+.1%}")
    lines.append(f"next: lmstack evaluate --workdir={summary['path']} ; lmstack export --workdir={summary['path']}")
    return "\n".join(lines)
