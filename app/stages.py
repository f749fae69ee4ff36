"""`lmstack pipeline`: every stage of a run from one YAML or JSON file, each done once.

    prepare ─► train ─► evaluate ─► optimize ─► export ─► serve ─► tflite ─► report
                                                 (per model family: WORKDIR/lstm, WORKDIR/transformer)

This is the one module that composes `pipelines/` (building a model) with
`serving/` (delivering it), which is why it lives with the command line.
Each stage of each model has a fingerprint: a hash of its settings, the model
settings and the run ids of the stages it reads from (for prepare: the
corpus files' bytes). WORKDIR/pipeline.json records the fingerprint of every
finished stage; a stage whose fingerprint is unchanged is not redone, one
whose inputs changed is redone from a clean state (and so is everything
after it, since their inputs now carry a new run id). `rerun` forces stages,
`skip` leaves them out.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from pipelines import workdir as workdir_lib
from app import settings as app_settings
from pipelines.errors import ConfigError, UserError
from pipelines.progress import Progress

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
    Stage("serve", ("export",), (), (("app.stages:ServeCheck", ()),),
          lambda r: f"REST {r['rest']['ms']:.0f} ms, gRPC {r['grpc']['ms']:.0f} ms for {r['prompt']!r}"),
    Stage("tflite", ("train", "optimize"), ("tflite",),
          (("serving.exporters.tflite:TFLiteConfig", ()), ("app.stages:DeviceCheck", ())),
          lambda r: f"{pathlib.Path(r['path']).name}, {r['bytes'] / 1e6:.2f} MB: {r['completion'][:40]!r}"),
    Stage("report", ("evaluate", "optimize", "tflite"), ("report",), (("app.stages:ReportSettings", ()),),
          lambda r: r["path"]),
)
STAGES = tuple(stage.name for stage in PIPELINE)
BY_NAME = {stage.name: stage for stage in PIPELINE}
STATE_FILE = "pipeline.json"
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
    families = data["models"]
    if not isinstance(families, dict) or any(f not in models.FAMILIES for f in families):
        raise UserError(f"--config={path}: `models` maps families ({', '.join(models.FAMILIES)}) to settings, "
                        f"got {families!r}")
    skip = tuple(data.get("skip") or ())
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
        workdir=(here / data["workdir"]) if not os.path.isabs(data["workdir"]) else pathlib.Path(data["workdir"]),
        corpus=tuple(str(here / c) if not os.path.isabs(c) else c for c in corpus),
        tokenizer=dict(tokenizer),
        models={f: dict(s or {}) for f, s in families.items()},
        stages={s: dict(data.get(s) or {}) for s in STAGES}, skip=skip)


@dataclasses.dataclass(frozen=True)
class ServeCheck:
    """The serve stage: `lmstack serve` on the newest export, asked over REST and gRPC, then stopped.

    Attributes:
        prompt: the prompt both protocols are asked to continue (greedy).
        max_new_tokens: tokens asked for.
        start_timeout: seconds to wait for the server to serve the model.
        sample_tokens: also ask for this many sampled tokens, shown in the summary (0: none).
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


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"corpus file {path}: {e.strerror}") from None
    return digest.hexdigest()


class Pipeline:
    """Runs the stages of a `PipelineConfig`, keeping WORKDIR/pipeline.json.

    Args:
        config: the run.
        progress: where the per-stage lines go.
        rerun: stages to redo even if their inputs did not change.
        families: model families to run (default: all of the config's).
    """

    def __init__(self, config: PipelineConfig, progress: Progress, rerun: tuple[str, ...] = (),
                 families: tuple[str, ...] = ()):
        bad = [s for s in rerun if s not in STAGES]
        if bad:
            raise UserError(f"--rerun: unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
        unknown = [f for f in families if f not in config.models]
        if unknown:
            raise UserError(f"--models: {', '.join(unknown)} not in the config (it has {', '.join(config.models)})")
        self.config = config
        self.progress = progress
        self.rerun = set(rerun)
        self.families = list(families or config.models)
        self.state_path = config.workdir / STATE_FILE
        self.state = workdir_lib.read_json(self.state_path) if self.state_path.is_file() else {"stages": {}}
        self.results: dict[str, dict[str, Any]] = {f: {} for f in self.families}

    def run(self) -> dict[str, Any]:
        """Runs every stage of every model; returns the summary."""
        workdir_lib.ensure_writable_dir(self.config.workdir)
        total = len(STAGES) * len(self.families)
        began = time.perf_counter()
        number = 0
        for family in self.families:
            for stage in STAGES:
                number += 1
                self._stage(number, total, family, stage)
        return {"workdir": str(self.config.workdir), "seconds": round(time.perf_counter() - began, 1),
                "models": self.results}

    def _fingerprint(self, family: str, stage: str) -> str:
        c = self.config
        inputs: dict[str, Any] = {"stage": stage, "settings": c.stages[stage], "model": c.models[family]}
        inputs["upstream"] = {s: self.state["stages"].get(f"{family}/{s}", {}).get("run_id")
                              for s in BY_NAME[stage].inputs}
        if stage == "prepare":
            inputs.update(corpus=[_file_hash(p) for p in c.corpus], tokenizer=c.tokenizer)
        return _hash(inputs)

    def _stage(self, number: int, total: int, family: str, stage: str) -> None:
        key = f"{family}/{stage}"
        label = f"[{number}/{total}] {family} {stage}"
        if stage in self.config.skip:
            self.progress.note(f"{label}: skipped (config)")
            return
        fingerprint = self._fingerprint(family, stage)
        done = self.state["stages"].get(key)
        if done and done["fingerprint"] == fingerprint and stage not in self.rerun:
            self.progress.note(f"{label}: up to date ({done.get('seconds', 0):.0f} s when run)")
            self.results[family][stage] = done.get("result", {})
            return
        wd = self.config.workdir / family
        if done or stage in self.rerun:
            for name in BY_NAME[stage].outputs:
                path = wd / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.progress.note(f"{label} ...")
        began = time.perf_counter()
        try:
            result = getattr(self, f"_{stage}")(family, wd, self.config.stages[stage])
        except ConfigError as e:  # a setting the library refused, in the file's words
            raise UserError(e.as_key(stage)) from None
        seconds = time.perf_counter() - began
        self.results[family][stage] = result
        self.state["stages"][key] = {"fingerprint": fingerprint, "run_id": f"{fingerprint}-{time.time():.0f}",
                                     "seconds": round(seconds, 1), "result": result}
        workdir_lib.write_json(self.state_path, self.state)
        self.progress.note(f"{label}: done in {seconds:.0f} s" + (f" ({BY_NAME[stage].brief(result)})" if result else ""))

    # -- the stages ---------------------------------------------------------------------------

    def _prepare(self, family, wd, settings):
        from pipelines import prepare

        (config,) = stage_configs("prepare", settings, self.config.corpus, self.config.tokenizer)
        prepare.prepare(config, wd, overwrite=True, progress=self.progress)
        manifest = workdir_lib.Workdir(wd).read_manifest()
        return {"vocab_size": manifest["tokenizer"]["vocab_size"],
                "train_tokens": manifest["splits"]["train"]["tokens"], "val_tokens": manifest["splits"]["val"]["tokens"]}

    def _train(self, family, wd, settings):
        import models
        from pipelines import train

        model_settings = dict(self.config.models[family])
        preset = model_settings.pop("preset", "small")
        settings = {**settings, **model_settings.pop("train", {})}
        vocab = workdir_lib.Workdir(wd).read_manifest()["tokenizer"]["vocab_size"]
        try:
            model_config = models.make_config(family, preset, vocab, **model_settings)
        except (ValueError, TypeError) as e:
            raise UserError(f"models.{family}: {e}") from None
        (train_config,) = stage_configs("train", settings)
        summary = train.train(wd, model_config, train_config, self.progress, verbose=0)
        return {k: summary[k] for k in ("params", "steps", "bits_per_char", "tokens_per_s", "wall_seconds")}

    def _evaluate(self, family, wd, settings):
        from pipelines import evaluate

        if settings:
            raise UserError(f"evaluate: takes no settings (got {', '.join(settings)})")
        result = evaluate.evaluate(wd, progress=self.progress)
        return {k: result[k] for k in ("loss", "perplexity", "bits_per_char")}

    def _optimize(self, family, wd, settings):
        from pipelines import optimize

        summary = optimize.optimize(wd, stage_configs("optimize", settings)[0],
                                    self.progress, verbose=0)
        return {k: summary[k] for k in ("variant", "perplexity_change", "sparsity", "bits_per_char")}

    def _export(self, family, wd, settings):
        from serving.exporters import savedmodel

        path = savedmodel.export(wd, stage_configs("export", settings)[0])
        return {"path": str(path)}

    def _serve(self, family, wd, settings):
        """`lmstack serve` on the newest export, one REST and one gRPC request, then SIGTERM."""
        from pipelines.launch import free_ports
        from serving import client as client_lib

        export_state = self.results[family].get("export") or {}
        if not export_state.get("path"):
            raise UserError(f"{family}: the serve stage needs the export stage; do not skip it")
        version = pathlib.Path(export_state["path"])
        name = version.parent.name
        grpc_port, rest_port = free_ports(2)
        server = subprocess.Popen([sys.executable, "-m", "app", "serve", f"--model_name={name}",
                                   f"--model_base_path={version.parent}", f"--port={grpc_port}",
                                   f"--rest_api_port={rest_port}", "--bind_address=127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        (check,) = stage_configs("serve", settings)
        prompt, count = check.prompt, check.max_new_tokens
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
            temperature, sample_tokens = check.temperature, check.sample_tokens
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
        return {"model_name": name, "version": int(version.name), "prompt": prompt, **answers}

    def _tflite(self, family, wd, settings):
        from models.generation import SamplerConfig
        from serving.exporters import backends, tflite

        config, check = stage_configs("tflite", settings)
        prompt, count = check.prompt, check.max_new_tokens
        path = tflite.convert(wd, config)
        began = time.perf_counter()
        text = backends.generate("tflite", wd, prompt, count, SamplerConfig("greedy"),
                                 variant=config.variant, quantize=config.quantize)
        return {"path": str(path), "bytes": path.stat().st_size, "prompt": prompt, "completion": text,
                "ms": round((time.perf_counter() - began) * 1e3, 1)}

    def _report(self, family, wd, settings):
        from pipelines import report
        from serving.exporters import tflite

        path = report.write(wd, latency=stage_configs("report", settings)[0].latency, progress=self.progress,
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


def summary_table(summary: dict[str, Any]) -> str:
    """Per model and variant: bits/char, parameters, sizes, latency per token; then where things are."""
    lines = ["| model | variant | bits/char | params | non-zero | SavedModel gzip | TFLite | ms/token |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, spec, scale=1.0, unit=""):
        if value is None:
            return "–"
        value = value * scale
        return format(int(value) if spec == "," else value, spec) + unit

    where = []
    for family, results in summary["models"].items():
        for row in (results.get("report") or {}).get("rows", []):
            lines.append(f"| {family} | {row['variant']} | {fmt(row['bits_per_char'], '.3f')} | "
                         f"{fmt(row['params'], ',')} | {fmt(row['nonzero_params'], ',')} | "
                         f"{fmt(row['gzip_bytes'], '.2f', 1e-6, ' MB')} | {fmt(row['tflite_bytes'], '.2f', 1e-6, ' MB')} | "
                         f"{fmt(row['ms_per_token'], '.2f')} |")
        root = pathlib.Path(summary["workdir"]) / family
        where.append(f"{family}: checkpoints {root / 'checkpoints'}")
        for stage, key in (("export", "path"), ("tflite", "path"), ("report", "path")):
            if (results.get(stage) or {}).get(key):
                where.append(f"  {stage}: {results[stage][key]}")
        if results.get("optimize"):
            where.append(f"  optimized: {root / 'optimized' / results['optimize']['variant']}")
    samples = []
    for family, results in summary["models"].items():
        served = results.get("serve") or {}
        if served.get("sample"):
            samples += [f"{family}, served, temperature {served['temperature']:g}:", "",
                        *("    " + line for line in (served["prompt"] + served["sample"]).splitlines()), ""]
    return "\n".join(lines + ["", "artifacts:"] + where + (["", "samples:", ""] + samples if samples else []))
