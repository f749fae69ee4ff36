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

Each stage's section holds the fields of its config dataclasses (`PIPELINE`),
the same settings the stage's command takes as flags. `load_config` checks
every name, type and value before any stage runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
from typing import Any, Callable

from app import settings as app_settings
from pipelines.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once; it runs as `Pipeline._NAME`.

    Attributes:
        name: its key in the config file and in pipeline.json.
        inputs: the stages it reads; its fingerprint includes their run ids.
        outputs: what it writes in the model's workdir, cleared before it is redone.
        settings: the config dataclasses its section fills ("module:Class"), each with the fields the
            pipeline fills in itself (loaded when needed: the library modules import TensorFlow).
        brief: a few words on its result, for its progress line.
    """
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    settings: tuple[tuple[str, tuple[str, ...]], ...]
    brief: Callable[[dict[str, Any]], str]


PIPELINE = (
    Stage("prepare", (), (), (("pipelines.prepare:PrepareConfig", ("corpus", "tokenizer")),),
          lambda r: f"{r['train_tokens']:,} training tokens, vocabulary {r['vocab_size']}"),
    Stage("train", ("prepare",), ("checkpoints", "logs", "metrics.json"), (("pipelines.training:TrainConfig", ()),),
          lambda r: f"{r['params']:,} parameters, {r['steps']} steps, {r['bits_per_char']:.3f} bits/char"),
    Stage("evaluate", ("train",), (), (),
          lambda r: f"{r['bits_per_char']:.3f} bits/char on the validation split"),
    Stage("optimize", ("train",), ("optimized",), (("pipelines.optimize:OptimizeConfig", ("overwrite",)),),
          lambda r: f"{r['variant']}: perplexity {r['perplexity_change']:+.1%}"),
    Stage("export", ("train", "optimize"), ("export",), (("serving.exporters.savedmodel:ExportConfig", ()),),
          lambda r: r["path"]),
    Stage("serve", ("export",), (), (("app.pipeline_file:ServeCheck", ()),),
          lambda r: f"REST {r['rest']['ms']:.0f} ms, gRPC {r['grpc']['ms']:.0f} ms for {r['prompt']!r}"),
    Stage("tflite", ("train", "optimize"), ("tflite",),
          (("serving.exporters.tflite:TFLiteConfig", ()), ("app.pipeline_file:DeviceCheck", ())),
          lambda r: f"{pathlib.Path(r['path']).name}, {r['bytes'] / 1e6:.2f} MB: {r['completion'][:40]!r}"),
    Stage("report", ("evaluate", "optimize", "tflite"), ("report",), (("app.pipeline_file:ReportSettings", ()),),
          lambda r: r["path"]),
)
STAGES = tuple(stage.name for stage in PIPELINE)
BY_NAME = {stage.name: stage for stage in PIPELINE}
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
        for section, cls, values, exclude in ((f"models.{family}", models.FAMILIES[family], settings, ("vocab_size",)),
                                              (f"models.{family}.train", None, train_settings, ())):
            try:
                app_settings.check_mapping(cls, values, exclude=exclude) if cls else stage_configs("train", values)
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
            stage_configs(stage, data.get(stage) or {}, corpus=("-",), tokenizer=tokenizer)
        except ConfigError as e:
            raise UserError(f"--config={path}: {e.as_key(stage)}") from None
    return PipelineConfig(
        workdir=_beside(here, data["workdir"]),
        corpus=tuple(str(_beside(here, c)) for c in corpus),
        tokenizer=dict(tokenizer),
        models={f: dict(s or {}) for f, s in families.items()},
        stages={s: dict(data.get(s) or {}) for s in STAGES}, skip=skip)


@dataclasses.dataclass(frozen=True)
class ServeCheck:
    """The serve stage: `lmstack serve` on the newest export, asked over REST and gRPC, then stopped.

    Attributes:
        prompt: the prompt both protocols are asked to continue (greedy).
        max_new_tokens: tokens asked for (a transformer: at most its context - 1).
        start_timeout: seconds to wait for the server to serve the model.
        sample_tokens: also ask for this many sampled tokens, shown in the summary (0: none; a
            transformer: at most its context - 1).
        temperature: the sample's temperature.
    """
    prompt: str = "ROMEO."
    max_new_tokens: int = 32
    start_timeout: float = 180.0
    sample_tokens: int = 0
    temperature: float = 0.8


@dataclasses.dataclass(frozen=True)
class DeviceCheck:
    """After converting, the tflite stage generates on the device runtime.

    Attributes:
        prompt: the prompt the TFLite file continues (greedy).
        max_new_tokens: tokens asked for.
    """
    prompt: str = "ROMEO."
    max_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """The report stage.

    Attributes:
        latency: measure TFLite latency per token (slower).
    """
    latency: bool = True


def stage_settings() -> dict[str, tuple[tuple[type, tuple[str, ...]], ...]]:
    """Each stage's settings: the config dataclasses they fill, less the fields the pipeline fills in."""
    def load(path: str) -> type:
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    return {stage.name: tuple((load(path), exclude) for path, exclude in stage.settings) for stage in PIPELINE}


def stage_configs(stage: str, values: dict[str, Any], corpus: tuple[str, ...] = (),
                  tokenizer: dict[str, Any] | None = None) -> list[Any]:
    """A stage's section as its config objects, checked and validated.

    Raises:
        ConfigError: a key none of the stage's configs has, a value of the wrong type, a bad value.
    """
    from pipelines import tokenizers

    configs, taken = [], set()
    for cls, exclude in stage_settings()[stage]:
        names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
        part = {k: v for k, v in values.items() if k in names}
        taken |= set(part)
        given = {"corpus": tuple(corpus), "tokenizer": tokenizers.TokenizerConfig(**(tokenizer or {}))} \
            if stage == "prepare" else {"overwrite": True} if stage == "optimize" else {}
        configs.append(app_settings.from_mapping(cls, part, **given))
        if hasattr(configs[-1], "validate"):
            configs[-1].validate()
    for key in values:
        if key not in taken:
            known = sorted({f.name for cls, exclude in stage_settings()[stage] for f in dataclasses.fields(cls)
                            if f.name not in exclude})
            raise ConfigError(key, values[key], f"no such setting; it takes {', '.join(known) or 'none'}")
    return configs
