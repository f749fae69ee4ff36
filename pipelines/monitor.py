"""What users send a served model, against what it was trained on: drift, window by window.

`lmstack serve` writes sampled requests as TensorFlow Serving's `PredictionLog` TFRecords (a model's
`logging_config`). This module reads them back (any TensorFlow filesystem), takes the prompts of
the language-model signatures (`prompt` of generate/serving_default, the streams and OpenAI routes;
`text` of score), cuts them into time windows, and measures each window against the workdir:

    js_divergence     Jensen-Shannon divergence (bits, 0..1) of the window's prompt-token unigram
                      distribution from the training split's; `js_baseline` is the same divergence
                      for validation text of the same number of tokens (what sampling alone gives),
                      and drift is judged on `js_excess` = js_divergence - js_baseline.
    unk_rate          the share of prompt tokens the tokenizer maps to its unknown token.
    perplexity_ratio  the model's perplexity on the prompts over its perplexity on validation text
                      cut to the same token lengths (short prompts are harder for any model, so the
                      lengths must match).
    prompt_tokens, completion_tokens  the lengths (mean and 95th percentile).

A window is flagged when one of them crosses its `Thresholds`; the defaults flag a change of
language or domain (measured in docs/results.md) and stay quiet on in-domain traffic. Windows with
fewer than `min_window_tokens` prompt tokens are shown but not judged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from pipelines import checkpoints, dataset, fs, tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError
from pipelines.progress import Progress

MONITOR_DIR = "monitor"
MONITOR_FILE = "monitor.json"
_PROMPT_INPUTS = ("prompt", "text")  # serving.contract's PROMPT (generation) and TEXT (score)
_COMPLETION_OUTPUT = "completion"
_TRAIN_TOKENS = 4_000_000  # enough of the training split for its unigram distribution
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Where a window counts as drifted (each a `lmstack monitor` flag).

    Attributes:
        max_js_excess: js_divergence above what same-sized validation text gives (bits).
        max_unk_rate: share of prompt tokens that are unknown to the tokenizer.
        max_perplexity_ratio: the prompts' perplexity over validation text's of the same lengths.
        min_window_tokens: a window with fewer prompt tokens is not judged (too little to tell).
    """
    max_js_excess: float = 0.04
    max_unk_rate: float = 0.02
    max_perplexity_ratio: float = 2.0
    min_window_tokens: int = 200


def parse_duration(text: str, field: str = "window") -> int:
    """'90s', '30m', '1h', '7d' (or seconds) -> seconds; ConfigError naming `field` otherwise."""
    text = text.strip()
    unit = text[-1:] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ConfigError(field, text, "a duration is a positive number with s, m, h or d (e.g. 1h)")
    return int(math.ceil(seconds))


@dataclasses.dataclass
class Logged:
    """One logged request's prompts and completions, and when it was answered."""
    time: int
    model: str
    prompts: list[str]
    completions: list[str]


def read_logs(prefix: str, progress: Progress | None = None) -> list[Logged]:
    """The language-model requests in the TFRecord files `PREFIX-*.tfrecord`, oldest first."""
    from tensorflow_serving.apis import prediction_log_pb2

    files = sorted(tf.io.gfile.glob(f"{prefix}-*.tfrecord"))
    if not files:
        raise ConfigError("logs", prefix, f"no request logs {prefix}-*.tfrecord (give the logging_config's "
                                          "filename_prefix of a model `lmstack serve` serves)")
    logged = []
    for record in tf.data.TFRecordDataset(files):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record.numpy())
        except Exception:  # protobuf's DecodeError: not a PredictionLog
            raise ConfigError("logs", prefix, "a record is not a TensorFlow Serving PredictionLog") from None
        if log.WhichOneof("log_type") != "predict_log":
            continue
        inputs, outputs = log.predict_log.request.inputs, log.predict_log.response.outputs
        key = next((k for k in _PROMPT_INPUTS if k in inputs), None)
        if key is None:
            continue
        prompts = [_text(v) for v in tf.make_ndarray(inputs[key]).reshape(-1)]
        completions = ([_text(v) for v in tf.make_ndarray(outputs[_COMPLETION_OUTPUT]).reshape(-1)]
                       if _COMPLETION_OUTPUT in outputs else [])
        logged.append(Logged(log.log_metadata.timestamp_secs, log.log_metadata.model_spec.name, prompts, completions))
    if progress:
        progress.note(f"read {len(logged)} logged requests from {len(files)} files")
    return sorted(logged, key=lambda item: item.time)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _split_tokens(wd: workdir_lib.Workdir, split: str, limit: int) -> np.ndarray:
    files = dataset.shard_files(wd.root, split)
    parts, total = [], 0
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        parts.append(tf.io.decode_raw(record, tf.int32).numpy())
        total += parts[-1].size
        if total >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0: the same distribution, 1: disjoint) of two count vectors."""
    p, q = p / max(p.sum(), 1), q / max(q.sum(), 1)
    m = (p + q) / 2

    def kl(a):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return max(0.0, (kl(p) + kl(q)) / 2)


class _Reference:
    """What the workdir says in-domain looks like: the training unigram counts, validation tokens,
    and the model's per-token losses."""

    def __init__(self, workdir: str | os.PathLike, seed: int, progress: Progress):
        self.wd = workdir_lib.Workdir(workdir)
        manifest = self.wd.read_manifest()
        self.tokenizer = tokenizers.load(self.wd.tokenizer_dir)
        self.vocab = int(manifest["tokenizer"]["vocab_size"])
        progress.note("counting the training split's tokens")
        self.train_counts = np.bincount(_split_tokens(self.wd, "train", _TRAIN_TOKENS), minlength=self.vocab)
        self.val = _split_tokens(self.wd, "val", _TRAIN_TOKENS)
        if self.val.size < 2:
            raise UserError(f"{self.wd.root} has no validation text to compare the logs with; prepare it "
                            "with --val_fraction > 0")
        self.unk = tokenizers.UNK_ID if manifest["tokenizer"].get("kind") in ("char", "byte", "wordpiece", "bpe") \
            else None
        self.model, config, _ = checkpoints.load_model(checkpoints.model_dir(workdir, ""))
        self.seq_len = config.seq_len
        self.random = np.random.default_rng(seed)

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        ids = self.tokenizer(tf.constant(list(texts)))
        rows = ids.to_list() if hasattr(ids, "to_list") else ids  # a RaggedTensor, or lists already
        return [np.asarray(row, np.int64).reshape(-1) for row in rows]

    def nats(self, rows: list[np.ndarray]) -> tuple[float, int]:
        """The model's summed next-token loss over the rows (each cut to the context) and the count."""
        rows = [r[:self.seq_len + 1] for r in rows if r.size >= 2]
        total, count = 0.0, 0
        for start in range(0, len(rows), 32):
            batch = rows[start:start + 32]
            width = max(r.size for r in batch) - 1
            x = np.zeros([len(batch), self.seq_len], np.int32)
            y = np.zeros([len(batch), self.seq_len], np.int32)
            mask = np.zeros([len(batch), self.seq_len], np.float64)
            for i, r in enumerate(batch):
                x[i, :r.size - 1], y[i, :r.size - 1], mask[i, :r.size - 1] = r[:-1], r[1:], 1
            logits = self.model(tf.constant(x[:, :max(width, 1)]), training=False)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y[:, :max(width, 1)],
                                                                logits=tf.cast(logits, tf.float32))
            total += float(np.sum(ce.numpy().astype(np.float64) * mask[:, :max(width, 1)]))
            count += int(mask.sum())
        return total, count

    def like(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Validation windows of the same lengths as `rows` (cut to the context), at random places."""
        out = []
        for r in rows:
            n = min(r.size, self.seq_len + 1, self.val.size)
            start = int(self.random.integers(0, self.val.size - n + 1))
            out.append(self.val[start:start + n])
        return out


def window_stats(ref: _Reference, requests: list[Logged], thresholds: Thresholds) -> dict[str, Any]:
    """One window's figures and the thresholds it crosses."""
    prompts = [p for r in requests for p in r.prompts]
    completions = [t for r in requests for t in r.completions]
    rows = ref.tokenize(prompts)
    done = ref.tokenize(completions)
    tokens = np.concatenate(rows) if rows else np.zeros([0], np.int64)
    counts = np.bincount(tokens, minlength=ref.vocab)[:ref.vocab] if tokens.size else np.zeros(ref.vocab)
    baseline_rows = ref.like(rows)
    baseline = np.concatenate(baseline_rows) if baseline_rows else np.zeros([0], np.int64)
    js = js_divergence(counts, ref.train_counts) if tokens.size else 0.0
    js_base = js_divergence(np.bincount(baseline, minlength=ref.vocab)[:ref.vocab], ref.train_counts) \
        if baseline.size else 0.0
    nats, n = ref.nats(rows)
    base_nats, base_n = ref.nats(baseline_rows)
    ratio = math.exp(min(700.0, nats / n - base_nats / base_n)) if n and base_n else None
    lengths = [r.size for r in rows] or [0]
    done_lengths = [r.size for r in done] or [0]
    stats = {
        "start": min(r.time for r in requests), "end": max(r.time for r in requests),
        "requests": len(requests), "prompts": len(prompts), "prompt_tokens_total": int(tokens.size),
        "js_divergence": js, "js_baseline": js_base, "js_excess": js - js_base,
        "unk_rate": float(np.mean(tokens == ref.unk)) if ref.unk is not None and tokens.size else 0.0,
        "perplexity": math.exp(min(700.0, nats / n)) if n else None,
        "perplexity_baseline": math.exp(min(700.0, base_nats / base_n)) if base_n else None,
        "perplexity_ratio": ratio,
        "prompt_tokens_mean": float(np.mean(lengths)), "prompt_tokens_p95": float(np.percentile(lengths, 95)),
        "completion_tokens_mean": float(np.mean(done_lengths)),
        "completion_tokens_p95": float(np.percentile(done_lengths, 95)),
    }
    crossed = []
    if tokens.size >= thresholds.min_window_tokens:
        if stats["js_excess"] > thresholds.max_js_excess:
            crossed.append("js_excess")
        if stats["unk_rate"] > thresholds.max_unk_rate:
            crossed.append("unk_rate")
        if ratio is not None and ratio > thresholds.max_perplexity_ratio:
            crossed.append("perplexity_ratio")
    stats["judged"] = bool(tokens.size >= thresholds.min_window_tokens)
    stats["drift"] = crossed
    return stats


def monitor(logs: str, workdir: str | os.PathLike, window: int = 3600, thresholds: Thresholds = Thresholds(),
            model: str = "", since: int = 0, seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Compares the logged prompts with the workdir's data and model, window by window, and writes
    WORKDIR/monitor/monitor.json and PNG plots.

    Args:
        logs: the logging_config's filename_prefix (local or any TensorFlow filesystem).
        window: seconds per window.
        model: only requests for this model name ('' : all).
        since: only requests of the last `since` seconds (0: all).
    Returns:
        `{"windows": [...], "thresholds": {...}, "drift": bool, "plots": [...]}`.
    """
    progress = progress or Progress()
    requests = [r for r in read_logs(logs, progress) if not model or r.model == model]
    if since:
        requests = [r for r in requests if r.time >= time.time() - since]
    if not requests:
        raise ConfigError("logs", logs, "no logged prompts" + (f" for model {model!r}" if model else "")
                          + (" in the time asked for (since)" if since else ""))
    ref = _Reference(workdir, seed, progress)
    groups: dict[int, list[Logged]] = {}
    for r in requests:
        groups.setdefault(r.time // window, []).append(r)
    windows = []
    for i, key in enumerate(sorted(groups)):
        progress.note(f"window {i + 1}/{len(groups)}: {len(groups[key])} requests")
        windows.append({"window_start": key * window, **window_stats(ref, groups[key], thresholds)})
    result = {"logs": logs, "window_seconds": window, "thresholds": dataclasses.asdict(thresholds),
              "windows": windows, "drift": any(w["drift"] for w in windows), "written": int(time.time())}
    out = ref.wd.root / MONITOR_DIR
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(windows, thresholds, out)
    workdir_lib.write_json(out / MONITOR_FILE, result)
    return result


def table(windows: list[dict[str, Any]]) -> str:
    """The windows as a markdown table."""
    def num(v, spec):
        return "—" if v is None else format(v, spec)

    lines = ["| window (UTC) | requests | prompt tokens | JS excess | [UNK] rate | perplexity ratio | "
             "prompt len (mean/p95) | completion len | drift |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for w in windows:
        drift = ", ".join(w["drift"]) if w["drift"] else ("no" if w["judged"] else "too few tokens")
        lines.append(f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime(w['window_start']))} | {w['requests']} | "
                     f"{w['prompt_tokens_total']} | {num(w['js_excess'], '.3f')} | {num(w['unk_rate'], '.3f')} | "
                     f"{num(w['perplexity_ratio'], '.2f')} | {w['prompt_tokens_mean']:.0f}/{w['prompt_tokens_p95']:.0f}"
                     f" | {w['completion_tokens_mean']:.0f} | {drift} |")
    return "\n".join(lines)


def plot(windows: list[dict[str, Any]], thresholds: Thresholds, out: fs.Path) -> list[str]:
    """monitor.png: the three drift figures over time, each with its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [w["window_start"] for w in windows]
    labels = [time.strftime("%m-%d %H:%M", time.gmtime(t)) for t in times]
    panels = (("js_excess", "JS divergence above baseline (bits)", thresholds.max_js_excess),
              ("unk_rate", "[UNK] rate", thresholds.max_unk_rate),
              ("perplexity_ratio", "perplexity / validation's", thresholds.max_perplexity_ratio))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 7), sharex=True)
    for ax, (key, title, limit) in zip(axes, panels):
        values = [np.nan if w[key] is None else w[key] for w in windows]
        ax.plot(range(len(values)), values, marker="o")
        crossed = [i for i, w in enumerate(windows) if key in w["drift"]]
        ax.scatter(crossed, [values[i] for i in crossed], color="red", zorder=3, label="drift")
        ax.axhline(limit, color="red", linestyle="--", linewidth=1, label="threshold")
        if key == "perplexity_ratio":
            ax.set_yscale("log")  # in-domain sits near 1; another language can be thousands
        ax.set_ylabel(title, fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    fig.suptitle("Served prompts against the training data, per window")
    fig.tight_layout()
    path = out / "monitor.png"
    workdir_lib.write_png(fig, path)
    plt.close(fig)
    return [str(path)]
