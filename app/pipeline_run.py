"""Running `lmstack pipeline`: every stage of a run from one YAML or JSON file, each done once.

    prepare ─► train ─► evaluate ─► optimize ─► export ─► serve ─► tflite ─► report
                                                 (per model family: WORKDIR/lstm, WORKDIR/transformer)

The stages (`app.pipeline_stages`) compose `pipelines/` (building a model) with `serving/`
(delivering it), which is why they live with the command line. Each stage of each model has a
fingerprint: a hash of its settings, the model settings and the run ids of the stages it reads
from (for prepare: the corpus files' bytes). WORKDIR/pipeline.json records the fingerprint of
every finished stage; a stage whose fingerprint is unchanged is not redone, one whose inputs
changed is redone from a clean state (and so is everything after it, since their inputs now
carry a new run id). `rerun` forces stages, `skip` leaves them out.

The file and its checks are `app.pipeline_file`; each stage's settings, inputs, outputs and run
function are declared once in `app.pipeline_stages`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from app.pipeline_file import PipelineConfig
from app.pipeline_stages import BY_NAME, STAGES, StageRun
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
            c = self.config
            result = BY_NAME[stage].run(StageRun(
                BY_NAME[stage], family, wd, c.stages[stage], c.corpus, c.tokenizer, c.models[family],
                self.results[family], self.progress))
        except ConfigError as e:  # a setting the library refused, in the file's words
            raise UserError(e.as_key(stage)) from None
        seconds = time.perf_counter() - began
        self.results[family][stage] = result
        self.state["stages"][key] = {"fingerprint": fingerprint, "run_id": f"{fingerprint}-{time.time():.0f}",
                                     "seconds": round(seconds, 1), "result": result}
        workdir_lib.write_json(self.state_path, self.state)
        brief = f" ({BY_NAME[stage].brief(result)})" if result else ""
        self.progress.note(f"{label}: done in {seconds:.0f} s{brief}")


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
