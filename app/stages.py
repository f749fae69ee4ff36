"""`lmstack pipeline`: every stage of a run from one YAML or JSON file, each done once.

    prepare ─► train ─► evaluate ─► optimize ─► export ─► serve ─► tflite ─► report
                                                 (per model family: WORKDIR/lstm, WORKDIR/transformer)

It composes `pipelines/` (building a model) with `serving/` (delivering it),
which is why it lives with the command line (as do the commands that call both).
Each stage of each model has a fingerprint: a hash of its settings, the model
settings and the run ids of the stages it reads from (for prepare: the
corpus files' bytes). WORKDIR/pipeline.json records the fingerprint of every
finished stage; a stage whose fingerprint is unchanged is not redone, one
whose inputs changed is redone from a clean state (and so is everything
after it, since their inputs now carry a new run id). `rerun` forces stages,
`skip` leaves them out.

The file, its stages and their settings are `app.pipeline_file`.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from typing import Any

from app.pipeline_file import BY_NAME, STAGES, PipelineConfig, stage_configs
from pipelines import fs
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from pipelines.progress import Progress

STATE_FILE = "pipeline.json"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with fs.path(path).open("rb") as f:
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
                fs.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
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
        brief = f" ({BY_NAME[stage].brief(result)})" if result else ""
        self.progress.note(f"{label}: done in {seconds:.0f} s{brief}")

    # -- the stages ---------------------------------------------------------------------------

    def _prepare(self, family, wd, settings):
        from pipelines import prepare

        (config,) = stage_configs("prepare", settings, self.config.corpus, self.config.tokenizer)
        prepare.prepare(config, wd, overwrite=True, progress=self.progress)
        manifest = workdir_lib.Workdir(wd).read_manifest()
        splits = manifest["splits"]
        return {"vocab_size": manifest["tokenizer"]["vocab_size"],
                "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]}

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
        from serving.server.versions import model_context

        export_state = self.results[family].get("export") or {}
        if not export_state.get("path"):
            raise UserError(f"{family}: the serve stage needs the export stage; do not skip it")
        version = fs.path(export_state["path"])
        name = version.parent.name
        grpc_port, rest_port = free_ports(2)
        server = subprocess.Popen([sys.executable, "-m", "app", "serve", f"--model_name={name}",
                                   f"--model_base_path={version.parent}", f"--port={grpc_port}",
                                   f"--rest_api_port={rest_port}", "--bind_address=127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        (check,) = stage_configs("serve", settings)
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
        return {"model_name": name, "version": int(version.name), "prompt": prompt, **answers}

    def _tflite(self, family, wd, settings):
        from models.samplers import SamplerConfig
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
                         f"{fmt(row['gzip_bytes'], '.2f', 1e-6, ' MB')} | "
                         f"{fmt(row['tflite_bytes'], '.2f', 1e-6, ' MB')} | "
                         f"{fmt(row['ms_per_token'], '.2f')} |")
        root = fs.path(summary["workdir"]) / family
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
