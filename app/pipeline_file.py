"""The pipeline file of `lmstack pipeline`: its stages, their settings, and reading it.

A config file (see quickstart.yaml):

    workdir: runs/quickstart
    corpus: [data/shakespeare.txt.gz]
    tokenizer: {kind: char}
    models: {lstm: {preset: small, train: {steps: 600}}, transformer: {preset: small, layers: 2}}
    prepare: {val_fraction: 0.05}
    train: {steps: 400, batch_size: 32}
    optimize: {method: prune, target_sparsity: 0.5, steps: 100}
    export: {variant: pruned50, model_name: lm}
    serve: {prompt: "ROMEO.", max_new_tokens: 32}
    tflite: {quantize: dynamic, prompt: "ROMEO.", max_new_tokens: 32}
    report: {latency: true}
    skip: []

Each stage's section holds the fields of its config dataclasses (the stages
are declared in `app.pipeline_stages`), the same settings the stage's command
takes as flags. `load_config` checks every name, type and value before any
stage runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from app import settings as app_settings
from app.pipeline_stages import BY_NAME, STAGES
from pipelines.errors import ConfigError, UserError


TOP_KEYS = {"workdir", "corpus", "tokenizer", "models", "skip", *STAGES}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A whole run, as read from the config file.

    Attributes:
        workdir: the run's root; each model family gets WORKDIR/FAMILY.
        corpus: text files (paths relative to the config file's directory).
        tokenizer: `pipelines.tokenizers.TokenizerConfig` fields.
        models: family -> {"preset": NAME, model overrides such as layers or d_model, and "train":
            this family's overrides of the train stage's settings}.
        stages: stage -> its settings.
        skip: stages left out.
    """
    workdir: pathlib.Path
    corpus: tuple[str, ...]
    tokenizer: dict[str, Any]
    models: dict[str, dict[str, Any]]
    stages: dict[str, dict[str, Any]]
    skip: tuple[str, ...] = ()


def _beside(here: pathlib.Path, value: str) -> Any:
    """A path from the config file: relative ones are relative to the file; URIs (gs://...) stay as they are."""
    from pipelines import fs  # TensorFlow's filesystems: not for `lmstack pipeline --help`

    path = fs.path(value)
    return here / path if fs.is_local(path) and not path.is_absolute() else path


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Reads a YAML or JSON pipeline config.

    Raises:
        UserError: an unreadable file, bad syntax, an unknown key, stage or model family.
    """
    import models
    from pipelines import tokenizers

    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--config={path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError and json.JSONDecodeError, with their line numbers
        raise UserError(f"--config={path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config={path}: expected a mapping of settings at the top")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UserError(f"--config={path}: unknown key(s) {', '.join(unknown)}; expected some of "
                        f"{', '.join(sorted(TOP_KEYS))}")
    for key in ("workdir", "corpus", "models"):
        if not data.get(key):
            raise UserError(f"--config={path}: `{key}` is required")
    if not isinstance(data["workdir"], str):
        raise UserError(f"--config={path}: `workdir` is a path, got {data['workdir']!r}")
    if not isinstance(data["corpus"], (str, list)) or not all(isinstance(c, str) for c in
                                                               ([data["corpus"]] if isinstance(data["corpus"], str)
                                                                else data["corpus"])):
        raise UserError(f"--config={path}: `corpus` is a file or a list of files, got {data['corpus']!r}")
    families = data["models"]
    if not isinstance(families, dict) or any(f not in models.FAMILIES for f in families) \
            or not all(isinstance(s, dict) or s is None for s in families.values()):
        raise UserError(f"--config={path}: `models` maps families ({', '.join(models.FAMILIES)}) to settings "
                        f"(mappings), got {families!r}")
    if not isinstance(data.get("tokenizer") or {}, dict):
        raise UserError(f"--config={path}: `tokenizer` holds settings such as {{kind: char}}, "
                        f"got {data['tokenizer']!r}")
    skip = data.get("skip") or []
    skip = [skip] if isinstance(skip, str) else skip  # one stage, or a list of them
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise UserError(f"--config={path}: `skip` is a list of stages, got {data.get('skip')!r}")
    skip = tuple(skip)
    bad = [s for s in skip if s not in STAGES]
    if bad:
        raise UserError(f"--config={path}: cannot skip {', '.join(bad)}; stages are {', '.join(STAGES)}")
    here = path.resolve().parent
    corpus = data["corpus"] if isinstance(data["corpus"], list) else [data["corpus"]]
    for stage in STAGES:
        if not isinstance(data.get(stage) or {}, dict):
            raise UserError(f"--config={path}: `{stage}` holds settings (a mapping), got {data[stage]!r}")
    for family, settings in families.items():
        settings = dict(settings or {})
        preset, train_settings = settings.pop("preset", "small"), settings.pop("train", {})
        presets = models.FAMILIES[family].PRESETS
        if preset not in presets:
            raise UserError(f"--config={path}: models.{family}.preset: expected one of {'|'.join(presets)} "
                            f"(got {preset})")
        if not isinstance(train_settings, dict):
            raise UserError(f"--config={path}: models.{family}.train: holds overrides of the train stage's "
                            f"settings (a mapping), got {train_settings!r}")
        # LoRA adapters go on a trained model (`lmstack train --lora_rank`), not on the pipeline's new one.
        lora_fields = tuple(f.name for f in dataclasses.fields(models.FAMILIES[family]) if f.name.startswith("lora_"))
        for section, cls, values, exclude in ((f"models.{family}", models.FAMILIES[family], settings,
                                               ("vocab_size", *lora_fields)),
                                              (f"models.{family}.train", None, train_settings, ())):
            try:
                app_settings.check_mapping(cls, values, exclude=exclude) if cls else BY_NAME["train"].configs(values)
            except ConfigError as e:
                raise UserError(f"--config={path}: {e.as_key(section)}" + (
                    "; a model also takes preset and train (overrides of the train stage)"
                    if "no such setting" in e.message and cls else "")) from None
    tokenizer = data.get("tokenizer") or {"kind": "char"}
    try:
        app_settings.from_mapping(tokenizers.TokenizerConfig, tokenizer).validate()
    except ConfigError as e:
        raise UserError(f"--config={path}: {e.as_key('tokenizer')}") from None
    for stage in STAGES:  # every setting checked now, not after the stages before it have run for an hour
        if stage in skip:
            continue
        try:
            BY_NAME[stage].configs(data.get(stage) or {}, tokenizer=tokenizer)
        except ConfigError as e:
            raise UserError(f"--config={path}: {e.as_key(stage)}") from None
    stages = {s: dict(data.get(s) or {}) for s in STAGES}
    if stages["serve"].get("request_logs"):  # a filename prefix: beside the file, as the other paths
        stages["serve"]["request_logs"] = str(_beside(here, stages["serve"]["request_logs"]))
    return PipelineConfig(
        workdir=_beside(here, data["workdir"]),
        corpus=tuple(str(_beside(here, c)) for c in corpus),
        tokenizer=dict(tokenizer),
        models={f: dict(s or {}) for f, s in families.items()},
        stages=stages, skip=skip)
