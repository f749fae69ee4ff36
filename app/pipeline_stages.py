"""The stages of `lmstack pipeline`, each declared once: its settings, what it reads and writes, how it runs.

    prepare ─► train ─► evaluate ─► optimize ─► export ─► serve ─► tflite ─► report

A `Stage` holds the config dataclasses its section of the pipeline file fills (the settings its
command takes as flags), the stages it reads (their run ids are part of its fingerprint), what it
writes in the model's workdir (cleared before it is redone), its run function and a brief of its
result for the progress line. `app.pipeline_file` reads the file against these declarations and
`app.pipeline_run` runs them. The library modules load when a stage runs (they import TensorFlow).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from app import settings as app_settings
from pipelines import fs
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from pipelines.progress import Progress


def _nothing(corpus: tuple[str, ...], tokenizer: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One config dataclass a stage's section fills.

    Attributes:
        cls: the dataclass, or "module:Class" for a library's (loaded when needed: they import TensorFlow).
        fill: the fields the pipeline fills in itself: (corpus, tokenizer settings) -> {field: value}.
    """
    cls: str | type
    fill: Callable[[tuple[str, ...], dict[str, Any]], dict[str, Any]] = _nothing

    def load(self) -> type:
        if isinstance(self.cls, type):
            return self.cls
        module, name = self.cls.split(":")
        return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: its key in the config file and in pipeline.json.
        inputs: the stages it reads; its fingerprint includes their run ids.
        outputs: what it writes in the model's workdir, cleared before it is redone.
        settings: the config dataclasses its section fills.
        run: does the stage for one model family; returns its result (kept in pipeline.json).
        brief: a few words on its result, for its progress line.
    """
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    settings: tuple[Settings, ...]
    run: Callable[[StageRun], dict[str, Any]]
    brief: Callable[[dict[str, Any]], str]

    def configs(self, values: dict[str, Any], corpus: tuple[str, ...] = ("-",),
                tokenizer: dict[str, Any] | None = None) -> list[Any]:
        """The stage's section as its config objects, checked and validated.

        Raises:
            ConfigError: a key none of the stage's configs has, a value of the wrong type, a bad value.
        """
        configs, known = [], set()
        for part in self.settings:
            cls, given = part.load(), part.fill(tuple(corpus), tokenizer or {})
            names = {f.name for f in dataclasses.fields(cls)} - set(given)
            known |= names
            configs.append(app_settings.from_mapping(cls, {k: v for k, v in values.items() if k in names}, **given))
            if hasattr(configs[-1], "validate"):
                configs[-1].validate()
        for key in values:
            if key not in known:
                raise ConfigError(key, values[key], f"no such setting; it takes {', '.join(sorted(known)) or 'none'}")
        return configs


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What a stage's run function gets.

    Attributes:
        stage: the stage's declaration.
        family: the model family; `wd` is its workdir (WORKDIR/FAMILY).
        settings: the stage's section of the pipeline file.
        corpus, tokenizer: the file's corpus and tokenizer settings.
        model: the file's settings of this family (preset, overrides, train overrides).
        earlier: the results of this family's stages so far, by stage.
        progress: where notes go.
    """
    stage: Stage
    family: str
    wd: Any
    settings: dict[str, Any]
    corpus: tuple[str, ...]
    tokenizer: dict[str, Any]
    model: dict[str, Any]
    earlier: dict[str, dict[str, Any]]
    progress: Progress

    def configs(self, values: dict[str, Any] | None = None) -> list[Any]:
        """The stage's settings (its section, or `values`) as its config objects."""
        return self.stage.configs(self.settings if values is None else values, self.corpus, self.tokenizer)


def _corpus_and_tokenizer(corpus: tuple[str, ...], tokenizer: dict[str, Any]) -> dict[str, Any]:
    from pipelines import tokenizers

    return {"corpus": corpus, "tokenizer": tokenizers.TokenizerConfig(**tokenizer)}


# -- the stages' settings that are the pipeline's own ----------------------------------------


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
        request_logs: a filename prefix (local or gs://): the server logs requests there with a
            model config's logging_config (TF Serving's PredictionLog TFRecords, which `lmstack monitor`
            reads); empty: no request logs.
        request_log_sampling_rate: the share of requests logged (0 to 1).
    """
    prompt: str = "ROMEO."
    max_new_tokens: int = 32
    start_timeout: float = 180.0
    sample_tokens: int = 0
    temperature: float = 0.8
    request_logs: str = ""
    request_log_sampling_rate: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.request_log_sampling_rate <= 1.0:
            raise ConfigError("request_log_sampling_rate", self.request_log_sampling_rate, "must be from 0 to 1")


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


# -- the stages -------------------------------------------------------------------------------


def _prepare(run: StageRun) -> dict[str, Any]:
    from pipelines import prepare

    (config,) = run.configs()
    prepare.prepare(config, run.wd, overwrite=True, progress=run.progress)
    manifest = workdir_lib.Workdir(run.wd).read_manifest()
    splits = manifest["splits"]
    return {"vocab_size": manifest["tokenizer"]["vocab_size"],
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]}


def _train(run: StageRun) -> dict[str, Any]:
    import models
    from pipelines import train

    model_settings = dict(run.model)
    preset = model_settings.pop("preset", "small")
    settings = {**run.settings, **model_settings.pop("train", {})}
    vocab = workdir_lib.Workdir(run.wd).read_manifest()["tokenizer"]["vocab_size"]
    try:
        model_config = models.make_config(run.family, preset, vocab, **model_settings)
    except (ValueError, TypeError) as e:
        raise UserError(f"models.{run.family}: {e}") from None
    (train_config,) = run.configs(settings)
    summary = train.train(run.wd, model_config, train_config, run.progress, verbose=0)
    return {k: summary[k] for k in ("params", "steps", "bits_per_char", "tokens_per_s", "wall_seconds")}


def _evaluate(run: StageRun) -> dict[str, Any]:
    from pipelines import evaluate

    result = evaluate.evaluate(run.wd, progress=run.progress)
    return {k: result[k] for k in ("loss", "perplexity", "bits_per_char")}


def _optimize(run: StageRun) -> dict[str, Any]:
    from pipelines import optimize

    summary = optimize.optimize(run.wd, run.configs()[0], run.progress, verbose=0)
    return {k: summary[k] for k in ("variant", "perplexity_change", "sparsity", "bits_per_char")}


def _export(run: StageRun) -> dict[str, Any]:
    from serving.exporters import savedmodel

    path = savedmodel.export(run.wd, run.configs()[0])
    return {"path": str(path)}


def _serve(run: StageRun) -> dict[str, Any]:
    """`lmstack serve` on the newest export, one REST and one gRPC request, then SIGTERM."""
    from pipelines.launch import free_ports
    from serving import client as client_lib
    from serving.server.versions import model_context

    export_state = run.earlier.get("export") or {}
    if not export_state.get("path"):
        raise UserError(f"{run.family}: the serve stage needs the export stage; do not skip it")
    version = fs.path(export_state["path"])
    name = version.parent.name
    grpc_port, rest_port = free_ports(2)
    (check,) = run.configs()
    model = [f"--model_name={name}", f"--model_base_path={version.parent}"]
    if check.request_logs:  # TF Serving's way: a model config file whose model has a logging_config
        config = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-serve-")) / "models.config"
        config.write_text(f"model_config_list {{ config {{ name: {json.dumps(name)} "
                          f"base_path: {json.dumps(str(version.parent))} logging_config {{ "
                          f"log_collector_config {{ type: \"tfrecord\" "
                          f"filename_prefix: {json.dumps(check.request_logs)} }} "
                          f"sampling_config {{ sampling_rate: {check.request_log_sampling_rate} }} }} }} }}")
        model = [f"--model_config_file={config}"]
    server = subprocess.Popen([sys.executable, "-m", "app", "serve", *model, f"--port={grpc_port}",
                               f"--rest_api_port={rest_port}", "--bind_address=127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # One setting serves both families: a transformer is asked for what fits its context.
    context = model_context(version)
    fit = (lambda n: n) if context is None else (lambda n: min(n, context - 1))
    prompt, count = check.prompt, fit(check.max_new_tokens)
    answers = {}
    try:
        rest = client_lib.connect(f"127.0.0.1:{rest_port}", "rest", model_name=name, retries=0, timeout=120)
        _wait_until_serving(rest, server, timeout=check.start_timeout)
        for protocol, port in (("rest", rest_port), ("grpc", grpc_port)):
            client = client_lib.connect(f"127.0.0.1:{port}", protocol, model_name=name, timeout=120)
            began = time.perf_counter()
            (text,) = client.generate([prompt], count)
            answers[protocol] = {"completion": text, "ms": round((time.perf_counter() - began) * 1e3, 1)}
        # What the model writes, for the summary: sampled (greedy decoding of a small model loops).
        temperature, sample_tokens = check.temperature, fit(check.sample_tokens)
        if sample_tokens:
            (answers["sample"],) = client.generate([prompt], sample_tokens, temperature=temperature, seed=0)
            answers["temperature"] = temperature
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    if server.returncode != 0:
        raise UserError(f"lmstack serve exited with status {server.returncode}: {err.strip().splitlines()[-1:]}")
    logs = {"request_logs": check.request_logs} if check.request_logs else {}
    return {"model_name": name, "version": int(version.name), "prompt": prompt, **answers, **logs}


def _tflite(run: StageRun) -> dict[str, Any]:
    from models.samplers import SamplerConfig
    from serving.exporters import backends, tflite

    config, check = run.configs()
    prompt, count = check.prompt, check.max_new_tokens
    path = tflite.convert(run.wd, config)
    began = time.perf_counter()
    text = backends.generate("tflite", run.wd, prompt, count, SamplerConfig("greedy"),
                             variant=config.variant, quantize=config.quantize)
    return {"path": str(path), "bytes": path.stat().st_size, "prompt": prompt, "completion": text,
            "ms": round((time.perf_counter() - began) * 1e3, 1)}


def _report(run: StageRun) -> dict[str, Any]:
    from pipelines import report
    from serving.exporters import tflite

    path = report.write(run.wd, latency=run.configs()[0].latency, progress=run.progress,
                        tflite_measure=tflite.measure)
    rows = workdir_lib.read_json(path.parent / "report.json")
    return {"path": str(path), "rows": [{k: r.get(k) for k in (
        "variant", "params", "nonzero_params", "gzip_bytes", "tflite_bytes", "bits_per_char", "ms_per_token")}
        for r in rows]}


def _wait_until_serving(client, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"lmstack serve exited with status {server.returncode} before serving: "
                            f"{server.stderr.read().strip().splitlines()[-1:]}")
        try:
            if any(s["state"] == "AVAILABLE" for s in client.status()):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    raise UserError(f"lmstack serve did not answer within {timeout:.0f} s")


PIPELINE = (
    Stage("prepare", (), (), (Settings("pipelines.prepare:PrepareConfig", _corpus_and_tokenizer),), _prepare,
          lambda r: f"{r['train_tokens']:,} training tokens, vocabulary {r['vocab_size']}"),
    Stage("train", ("prepare",), ("checkpoints", "logs", "metrics.json"), (Settings("pipelines.training:TrainConfig"),),
          _train, lambda r: f"{r['params']:,} parameters, {r['steps']} steps, {r['bits_per_char']:.3f} bits/char"),
    Stage("evaluate", ("train",), (), (), _evaluate,
          lambda r: f"{r['bits_per_char']:.3f} bits/char on the validation split"),
    Stage("optimize", ("train",), ("optimized",),
          (Settings("pipelines.optimize:OptimizeConfig", lambda corpus, tokenizer: {"overwrite": True}),), _optimize,
          lambda r: f"{r['variant']}: perplexity {r['perplexity_change']:+.1%}"),
    Stage("export", ("train", "optimize"), ("export",), (Settings("serving.exporters.savedmodel:ExportConfig"),),
          _export, lambda r: r["path"]),
    Stage("serve", ("export",), (), (Settings(ServeCheck),), _serve,
          lambda r: f"REST {r['rest']['ms']:.0f} ms, gRPC {r['grpc']['ms']:.0f} ms for {r['prompt']!r}"),
    Stage("tflite", ("train", "optimize"), ("tflite",),
          (Settings("serving.exporters.tflite:TFLiteConfig"), Settings(DeviceCheck)), _tflite,
          lambda r: f"{pathlib.Path(r['path']).name}, {r['bytes'] / 1e6:.2f} MB: {r['completion'][:40]!r}"),
    Stage("report", ("evaluate", "optimize", "tflite"), ("report",),
          (Settings(ReportSettings),), _report, lambda r: r["path"]),
)
STAGES = tuple(stage.name for stage in PIPELINE)
BY_NAME = {stage.name: stage for stage in PIPELINE}


def stage_settings() -> dict[str, tuple[tuple[type, tuple[str, ...]], ...]]:
    """Each stage's settings: the config dataclasses they fill, with the fields the pipeline fills in."""
    return {stage.name: tuple((part.load(), tuple(part.fill(("-",), {}))) for part in stage.settings)
            for stage in PIPELINE}
