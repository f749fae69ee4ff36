"""`report`: one page comparing the trained model with its optimized (and TFLite) variants.

Per variant: parameters and non-zeros, SavedModel size raw and gzip'd (the
Keras model saved by `tf.saved_model.save`, gzip'd as one tar), TFLite size,
validation perplexity and bits/char (from each model's metrics), and the CPU
latency of one greedily generated token (the cached decoder, batch 1, median
of repeats after a warm-up). Written to WORKDIR/report/report.md with PNG
plots: size against quality, and the training loss curves of the run and of
each variant's fine-tuning.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import platform
import shutil
import statistics
import tarfile
import tempfile
import time
from typing import Any, Callable

import tensorflow as tf

import models
from pipelines import checkpoints, evaluate, fs, mot
from pipelines import workdir as workdir_lib
from pipelines.generate import TextGenerator
from pipelines.progress import Progress

REPORT_DIR = "report"
DENSE = "dense"


@dataclasses.dataclass
class Row:
    """One model of the report."""
    variant: str
    method: str
    family: str
    params: int | None = None
    nonzero_params: int | None = None
    saved_model_bytes: int | None = None
    gzip_bytes: int | None = None
    tflite_bytes: int | None = None
    perplexity: float | None = None
    bits_per_char: float | None = None
    ms_per_token: float | None = None
    sparsity: float | None = None
    weights: list = dataclasses.field(default_factory=list)


def model_sizes(model) -> tuple[int, int]:
    """`(SavedModel bytes, gzip'd bytes)` of the Keras model alone (no tokenizer, no signatures)."""
    path = tempfile.mkdtemp(prefix="lmstack-size-")
    try:
        tf.saved_model.save(model, path)
        raw = sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as tar:
            tar.add(path, arcname="model")
        return raw, buffer.tell()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def token_latency(generator: TextGenerator, tokens: int = 32, repeats: int = 3) -> float:
    """Milliseconds per greedily generated token, batch 1 (median of `repeats`)."""
    tokens = min(tokens, (generator.decoder.max_length or tokens + 2) - 2)
    generator.generate(["ROMEO."], tokens)  # traces the decoding step
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        generator.generate(["ROMEO."], tokens)
        times.append((time.perf_counter() - began) / tokens * 1e3)
    return statistics.median(times)


def _dense_metrics(wd: workdir_lib.Workdir, model, config, progress: Progress) -> dict[str, Any]:
    path = wd.root / evaluate.METRICS_FILE
    metrics = workdir_lib.read_json(path) if path.is_file() else {}
    if metrics.get("text") != "validation split":  # evaluated on another corpus, or never
        progress.note("evaluating the trained model on the validation split")
        metrics = evaluate.evaluate_model(wd.root, model, config, write=False)
    return metrics


def collect(workdir: str | os.PathLike, latency: bool = True, progress: Progress | None = None,
            tflite_measure: Callable[..., dict[str, Any]] | None = None) -> list[Row]:
    """The trained model, each optimized variant and each TFLite file, measured.

    `tflite_measure(workdir, path, latency)` -> `{perplexity, bits_per_char, ms_per_token}`
    measures a TFLite file. The command line passes `serving.exporters.tflite.measure` in, so
    this package keeps to its side of the layering; without it, TFLite rows have
    their size only.
    """
    progress = progress or Progress()
    wd = workdir_lib.Workdir(workdir)
    wd.read_config()
    rows = []
    for variant in ["", *checkpoints.variants(wd.root)]:
        progress.note(f"measuring {variant or DENSE}")
        source = checkpoints.model_dir(wd.root, variant)
        generator = TextGenerator(wd.root, variant)
        model, config = generator.model, generator.config
        if variant:
            metrics = workdir_lib.read_json(source / evaluate.METRICS_FILE)
            metrics = {**metrics, **metrics.get("evaluation", {})}
            method = metrics["method"]
        else:
            metrics, method = _dense_metrics(wd, model, config, progress), "trained"
        nonzero, params = mot.count_nonzero(model)
        raw, gz = model_sizes(model)
        rows.append(Row(variant or DENSE, method, models.family_of(config), params, nonzero, raw, gz,
                        perplexity=metrics["perplexity"], bits_per_char=metrics["bits_per_char"],
                        ms_per_token=token_latency(generator) if latency else None,
                        sparsity=metrics.get("sparsity"), weights=metrics.get("weights", [])))
    for path in sorted((wd.root / "tflite").glob("*.tflite")):
        sidecar = path.with_suffix(".json")
        info = workdir_lib.read_json(sidecar) if sidecar.is_file() else {}
        progress.note(f"measuring {path.name}")
        figures = tflite_measure(wd.root, path, latency) if tflite_measure else {}
        rows.append(Row(path.stem, "tflite", info.get("family", ""), tflite_bytes=path.stat().st_size,
                        perplexity=figures.get("perplexity"), bits_per_char=figures.get("bits_per_char"),
                        ms_per_token=figures.get("ms_per_token")))
    for path in sorted((wd.root / "tflite").glob("*.litertlm")):  # LiteRT-LM bundles of those files
        inside = next((r for r in rows if r.variant == path.stem and r.method == "tflite"), None)
        rows.append(dataclasses.replace(inside, method="litertlm", tflite_bytes=path.stat().st_size) if inside
                    else Row(path.stem, "litertlm", "transformer", tflite_bytes=path.stat().st_size))
    return rows


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def table(rows: list[Row]) -> str:
    """The comparison as a markdown table (ratios against the dense row)."""
    dense = rows[0]
    head = ("| variant | method | non-zero params | SavedModel MB | gzip MB | gzip vs dense | TFLite MB "
            "| val perplexity | vs dense | bits/char | ms/token |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = r.gzip_bytes / dense.gzip_bytes if r.gzip_bytes and dense.gzip_bytes else None
        change = r.perplexity / dense.perplexity - 1 if r.perplexity and dense.perplexity else None
        nonzero = f"{r.nonzero_params:,} of {r.params:,}" if r.params else "–"
        lines.append(
            f"| {r.variant} | {r.method} | {nonzero} | {_fmt(r.saved_model_bytes, '.2f', 1e6)} "
            f"| {_fmt(r.gzip_bytes, '.2f', 1e6)} | {_fmt(ratio, '.0%')} | {_fmt(r.tflite_bytes, '.2f', 1e6)} "
            f"| {_fmt(r.perplexity, '.3f')} | {_fmt(change, '+.1%')} | {_fmt(r.bits_per_char, '.3f')} "
            f"| {_fmt(r.ms_per_token, '.2f')} |")
    return "\n".join(lines)


def _loss_curve(log_dir: fs.Path) -> list[tuple[int, float]]:
    points = []
    for path in sorted(tf.io.gfile.glob(str(log_dir / "train" / "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "batch_loss":
                    points.append((int(event.step), float(tf.make_ndarray(value.tensor))))
    return sorted(points)


def plot(rows: list[Row], wd: workdir_lib.Workdir, out: fs.Path) -> list[str]:
    """Writes the PNGs; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    sized = [r for r in rows if (r.gzip_bytes or r.tflite_bytes) and r.bits_per_char]
    if sized:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sized:
            size = (r.gzip_bytes or r.tflite_bytes) / 1e6
            ax.scatter(size, r.bits_per_char, marker="s" if r.method == "tflite" else "o")
            ax.annotate(r.variant, (size, r.bits_per_char), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("size, MB (gzip'd SavedModel; TFLite file)")
        ax.set_ylabel("validation bits per character")
        ax.set_title("size against quality (lower left is better)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        workdir_lib.write_png(fig, out / "size_vs_quality.png")
        plt.close(fig)
        written.append("size_vs_quality.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = 0
    dense = _loss_curve(wd.root / "logs")
    if dense:
        ax.plot(*zip(*dense), label="training", linewidth=1.5)
        curves += 1
    for variant in checkpoints.variants(wd.root):
        source = checkpoints.model_dir(wd.root, variant)
        start = (checkpoints.optimization(source) or {}).get("start_step", 0)
        points = _loss_curve(source / "logs")
        if points:
            ax.plot([start + s for s, _ in points], [v for _, v in points], label=f"{variant} (fine-tuning)",
                    linewidth=1)
            curves += 1
    if curves:
        ax.set_xlabel("step (a variant's fine-tuning continues from the step it started at)")
        ax.set_ylabel("training loss, nats/token")
        ax.set_title("loss curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        workdir_lib.write_png(fig, out / "loss_curves.png")
        written.append("loss_curves.png")
    plt.close(fig)
    return written


def sparsity_table(rows: list[Row]) -> str:
    """Per weight matrix: sparsity (pruned variants) or distinct values (clustered ones)."""
    parts = []
    for r in rows:
        if not r.weights or r.method not in ("prune", "prune_qat", "cluster"):
            continue
        column = "distinct values" if r.method == "cluster" else "sparsity"
        lines = [f"**{r.variant}** ({r.method})", "", f"| weight | shape | {column} |", "|---|---|---|"]
        for w in r.weights:
            if r.method == "cluster" or w.get("pruned"):
                value = f"{w['distinct']:,}" if r.method == "cluster" else f"{w['sparsity']:.1%}"
                lines.append(f"| {w['weight']} | {'x'.join(map(str, w['shape']))} | {value} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def monitor_section(wd: workdir_lib.Workdir) -> list[str]:
    """The last `lmstack monitor` run's windows and plot (none if it never ran)."""
    from pipelines import monitor

    path = wd.root / monitor.MONITOR_DIR / monitor.MONITOR_FILE
    if not path.is_file():
        return []
    result = workdir_lib.read_json(path)
    drifted = sum(1 for w in result["windows"] if w["drift"])
    return ["## Served traffic against the training data (the last `lmstack monitor`)", "",
            f"Request logs {result['logs']}, windows of {result['window_seconds']} s, checked "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(result['written']))} UTC: "
            + (f"**{drifted} of {len(result['windows'])} windows drifted**." if drifted else "no drift."), "",
            monitor.table(result["windows"]), "", f"![monitor](../{monitor.MONITOR_DIR}/monitor.png)", ""]


def write(workdir: str | os.PathLike, latency: bool = True, progress: Progress | None = None,
          tflite_measure: Callable[..., dict[str, Any]] | None = None) -> fs.Path:
    """Measures every model of the workdir and writes WORKDIR/report/ (report.md, PNGs, report.json)."""
    progress = progress or Progress()
    wd = workdir_lib.Workdir(workdir)
    rows = collect(wd.root, latency, progress, tflite_measure)
    out = wd.root / REPORT_DIR
    out.mkdir(exist_ok=True)
    pngs = plot(rows, wd, out)
    family = rows[0].family
    text = [
        f"# lmstack report: {wd.root.name}",
        "",
        f"{family} model and its variants, measured {time.strftime('%Y-%m-%d %H:%M')} on "
        f"{platform.node()} ({os.cpu_count()} CPUs, TensorFlow {tf.__version__}). Perplexity and bits/char "
        "are on the validation split; sizes are the Keras model's SavedModel (no tokenizer or serving "
        "signatures), raw and gzip'd; ms/token is greedy generation with the cached decoder, batch 1, on "
        "the CPU (TFLite files: ai-edge-litert, 1 thread).",
        "",
        table(rows),
        "",
    ]
    text += [f"![{p}]({p})\n" for p in pngs]
    detail = sparsity_table(rows)
    if detail:
        text += ["## Per-weight detail", "", detail, ""]
    text += monitor_section(wd)
    workdir_lib.write_json(out / "report.json", [dataclasses.asdict(r) for r in rows])
    (out / "report.md").write_text("\n".join(text), encoding="utf-8")
    return out / "report.md"
