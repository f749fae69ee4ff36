"""TFLite files of the `small` models against Keras and SavedModel, in one run.

For each model bench/quality.py trains with the defaults (runs/bench-quality/{transformer,lstm}/defaults)
converts the float32, float16, dynamic and int8 files (and the `qat` variant to
int8 when bench/optimize.py made it) through `lmstack tflite`'s code, then
measures per file: size, the interpreter's resident memory (a fresh process:
RSS after loading and one decode step, minus RSS before), ms per generated
token in ai-edge-litert with XNNPACK at 1 and 2 threads (greedy, batch 1, the
decode/step signature), and bits/char on the first validation windows. The
references, same run: the Keras decoding step (`call_with_cache` on one token,
tf.function, XLA, over the same full-context cache as the TFLite file) and the
exported SavedModel's `serving_default` (greedy, per token), when the workdir
has an export.

Targets: int8 file <= 30 % of float32; int8 and dynamic within +3 % perplexity
of float32; TFLite decode per token faster than the Keras step.

LiteRT-LM rows (the transformer, float32 and int8): the `.litertlm` bundle of the
same file in Google's LiteRT-LM engine (CPU backend, its own benchmark counters:
prefill and decode tokens per second) against lmstack's device loop on the file
inside it (`serving.edge`: the prefill call of the prompt, then ms per decode
call), at 1 and 2 threads, one prompt of 16 tokens and 64 new ones. Goal: the
engine at least as fast as lmstack's loop.

Prints a table per model and writes bench/results/tflite.json.

usage: python bench/edge.py [--models=transformer,lstm] [--windows=256] [--rerun] [--litertlm_only]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: F401  (environment before TensorFlow)
import numpy as np
import tensorflow as tf

import models
from pipelines import checkpoints, dataset, tokenizers
from serving import contract as c
from serving import edge
from serving.exporters import tflite

RESULTS = ROOT / "bench" / "results"
NEW_TOKENS = 64
FILES = [("", "none"), ("", "float16"), ("", "dynamic"), ("", "int8"), ("qat", "int8")]
MEMORY_PROBE = """
import sys, numpy as np
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
sys.path.insert(0, {root!r})
from serving import edge
model = edge.EdgeModel({path!r}, num_threads=1)
model.generate([1, 2, 3], 2)
print(rss() - before)
"""


def nats_per_char(logits_fn, windows, chars_per_token: float) -> float:
    total, count = 0.0, 0
    for x, y in windows:
        logits = logits_fn(x).astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        total += float(np.sum(np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0] - logits[np.arange(len(y)), y]))
        count += len(y)
    return total / count / math.log(2.0) / chars_per_token


def decode_ms(model: edge.EdgeModel, prompt: list[int], repeats: int = 3) -> float:
    """ms per decode/step call (the prompt's prefill is not counted)."""
    times = []
    for _ in range(repeats):
        steps = model.steps(prompt)
        logits = next(steps)
        began = time.perf_counter()
        for _ in range(NEW_TOKENS):
            logits = steps.send(int(np.argmax(logits)))
        times.append((time.perf_counter() - began) / NEW_TOKENS * 1e3)
        steps.close()
    return statistics.median(times)


def keras_step_ms(model, config, prompt: list[int], repeats: int = 3) -> float:
    decoder = models.decoder(model, config)
    step = tf.function(decoder.call_with_cache, jit_compile=True)
    times = []
    for _ in range(repeats + 1):  # the first traces
        cache = decoder.init_cache(1)  # the transformer's full context, as the TFLite file's cache
        _, cache = decoder.call_with_cache(tf.constant([prompt]), cache, 0)
        token = tf.constant([[prompt[-1]]], tf.int32)
        began = time.perf_counter()
        for i in range(NEW_TOKENS):
            logits, cache = step(token, cache, tf.constant(len(prompt) + i, tf.int32))
            token = tf.argmax(logits[:, -1], axis=-1, output_type=tf.int32)[:, tf.newaxis]
        token.numpy()
        times.append((time.perf_counter() - began) / NEW_TOKENS * 1e3)
    return statistics.median(times[1:])


def savedmodel_ms(workdir: pathlib.Path, repeats: int = 3) -> float | None:
    base = workdir / "export" / c.DEFAULT_MODEL_NAME
    versions = sorted((int(p.name), p) for p in base.glob("*") if p.name.isdigit())
    if not versions:
        return None
    fn = tf.saved_model.load(str(versions[-1][1])).signatures[c.SERVING_DEFAULT]
    args = dict(prompt=tf.constant(["ROMEO."]), max_new_tokens=tf.constant([NEW_TOKENS], tf.int32))
    fn(**args)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn(**args)
        times.append((time.perf_counter() - began) / NEW_TOKENS * 1e3)
    return statistics.median(times)


def litertlm_rows(workdir: pathlib.Path, prompt: list[int], rerun: bool) -> list[dict]:
    """The engine against lmstack's loop on the same file, per quantization and thread count."""
    import tempfile

    import litert_lm

    rows = []
    for quantize in ("none", "int8"):
        name = tflite.file_name("transformer", "", quantize)
        bundle = workdir / "tflite" / f"{name}.litertlm"
        if rerun or not bundle.is_file():
            bundle = tflite.convert(workdir, tflite.TFLiteConfig(quantize=quantize, format="litertlm"))
        text = edge.EdgeModel(bundle.with_suffix(".tflite")).tokenizer.decode(prompt[1:])
        for threads in (1, 2):
            ours = edge.EdgeModel(bundle.with_suffix(".tflite"), num_threads=threads)
            ids = ours.tokenizer.encode(text)
            prefill = []
            for _ in range(3):
                began = time.perf_counter()
                next(ours.steps(ids))
                prefill.append((time.perf_counter() - began) * 1e3)
            with tempfile.TemporaryDirectory() as cache:
                engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=threads),
                                          enable_benchmark=True, cache_dir=cache)
                runs = []
                for _ in range(3):
                    session = engine.create_session(apply_prompt_template=False, max_output_tokens=NEW_TOKENS)
                    session.run_prefill([text])
                    session.run_decode()
                    info = session.get_benchmark_info()
                    runs.append((info.last_prefill_token_count / info.last_prefill_tokens_per_second * 1e3,
                                 1e3 / info.last_decode_tokens_per_second))
                    session.close()
                engine.close()
            rows.append({"file": bundle.name, "threads": threads, "bytes": bundle.stat().st_size,
                         "engine_prefill_ms": statistics.median(r[0] for r in runs),
                         "engine_ms_per_token": statistics.median(r[1] for r in runs),
                         "lmstack_prefill_ms": statistics.median(prefill),
                         "lmstack_ms_per_token": decode_ms(ours, ids)})
            print(f"  {bundle.name} {threads} threads: done", file=sys.stderr)
    return rows


def memory(path: pathlib.Path) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=str(ROOT), path=str(path))],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,lstm")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--windows", type=int, default=256, help="validation windows for bits/char")
    parser.add_argument("--rerun", action="store_true", help="reconvert files that exist")
    parser.add_argument("--litertlm_only", action="store_true", help="only the LiteRT-LM rows (the transformer)")
    args = parser.parse_args()
    machine = {"node": platform.node(), "cpus": len(tf.config.list_logical_devices("CPU"))}
    results = {"benchmark": "tflite", "machine": machine,
               "tensorflow": tf.__version__, "new_tokens": NEW_TOKENS, "windows": args.windows, "models": {}}
    for family in args.models.split(","):
        workdir = pathlib.Path(args.workdir) / family / "defaults"  # bench/quality.py's row of the defaults
        if not (workdir / "checkpoints").is_dir():
            sys.exit(f"{workdir} has no trained model: run `python bench/quality.py --rows={family}/defaults` first")
        model, config, _ = checkpoints.load_model(workdir)
        manifest = json.loads((workdir / "data" / "manifest.json").read_text())
        val = manifest["splits"]["val"]
        chars_per_token = val["chars"] / val["tokens"]
        windows = [(x.numpy()[0], y.numpy()[0]) for x, y in
                   dataset.val_dataset(workdir, config.seq_len, 1).take(args.windows)]
        prompt = [tokenizers.EOS_ID] + [int(t) for t in windows[0][0][:15]]
        if family == "transformer":
            engine_rows = litertlm_rows(workdir, prompt, args.rerun)
            print(f"\n## LiteRT-LM engine against lmstack's device loop ({family}, small), "
                  f"{len(prompt) - 1}-token prompt, {NEW_TOKENS} new tokens\n")
            print("| bundle | threads | MB | engine prefill ms | lmstack prefill ms | engine ms/token "
                  "| lmstack ms/token | engine speed-up |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in engine_rows:
                print(f"| {r['file']} | {r['threads']} | {r['bytes'] / 1e6:.2f} | {r['engine_prefill_ms']:.2f} "
                      f"| {r['lmstack_prefill_ms']:.2f} | {r['engine_ms_per_token']:.2f} "
                      f"| {r['lmstack_ms_per_token']:.2f} "
                      f"| {r['lmstack_ms_per_token'] / r['engine_ms_per_token']:.2f}× |")
            results["models"].setdefault(family, {})["litertlm"] = engine_rows
        if args.litertlm_only:
            continue
        rows = [{"file": "keras (checkpoint)", "bits_per_char": nats_per_char(
                    lambda x, model=model: model(x[None])[0].numpy(), windows, chars_per_token),
                 "ms_per_token_1": keras_step_ms(model, config, prompt)}]
        saved = savedmodel_ms(workdir)
        if saved is not None:
            rows.append({"file": "savedmodel (serving_default)", "ms_per_token_1": saved})
        for variant, quantize in FILES:
            if variant and variant not in checkpoints.variants(workdir):
                continue
            try:
                path = tflite.find(workdir, variant, quantize)
                if args.rerun:
                    raise FileNotFoundError
            except Exception:
                path = tflite.convert(workdir, tflite.TFLiteConfig(variant=variant, quantize=quantize))
            row = {"file": path.name, "bytes": path.stat().st_size, "memory_bytes": memory(path)}
            for threads in (1, 2):
                row[f"ms_per_token_{threads}"] = decode_ms(edge.EdgeModel(path, num_threads=threads), prompt)
            row["bits_per_char"] = nats_per_char(edge.EdgeModel(path).window_logits, windows, chars_per_token)
            rows.append(row)
            print(f"  {family} {path.name}: done", file=sys.stderr)
        float32 = next(r for r in rows if r["file"].endswith("-float32.tflite"))
        keras_row = rows[0]
        print(f"\n## {family} (small), {args.windows} validation windows, {NEW_TOKENS} new tokens\n")
        print("| model | MB | vs float32 | interpreter MB | ms/token 1 thread | 2 threads | vs Keras step "
              "| bits/char |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            mb = f"{r['bytes'] / 1e6:.2f}" if "bytes" in r else "–"
            ratio = f"{r['bytes'] / float32['bytes']:.0%}" if "bytes" in r else "–"
            mem = f"{r['memory_bytes'] / 1e6:.1f}" if "memory_bytes" in r else "–"
            two = f"{r['ms_per_token_2']:.2f}" if "ms_per_token_2" in r else "–"
            speed = f"{keras_row['ms_per_token_1'] / r['ms_per_token_1']:.2f}×"
            bpc = f"{r['bits_per_char']:.3f}" if "bits_per_char" in r else "–"
            print(f"| {r['file']} | {mb} | {ratio} | {mem} | {r['ms_per_token_1']:.2f} | {two} | {speed} | {bpc} |")
        by = {r["file"]: r for r in rows}
        int8 = by.get(f"{family}-int8.tflite")
        dynamic = by.get(f"{family}-dynamic.tflite")
        ppl = lambda r, chars_per_token=chars_per_token: 2 ** (r["bits_per_char"] * chars_per_token)  # per token
        targets = [
            ("int8 file <= 30 % of float32", f"{int8['bytes'] / float32['bytes']:.1%}",
             int8["bytes"] <= 0.30 * float32["bytes"]),
            ("int8 perplexity <= +3 % of float32", f"{ppl(int8) / ppl(float32) - 1:+.2%}",
             ppl(int8) <= 1.03 * ppl(float32)),
            ("dynamic perplexity <= +3 % of float32", f"{ppl(dynamic) / ppl(float32) - 1:+.2%}",
             ppl(dynamic) <= 1.03 * ppl(float32)),
            ("TFLite float32 decode faster than the Keras step",
             f"{keras_row['ms_per_token_1'] / float32['ms_per_token_1']:.2f}×",
             float32["ms_per_token_1"] < keras_row["ms_per_token_1"]),
        ]
        print()
        for what, value, ok in targets:
            print(f"- {what}: {value} ({'met' if ok else 'NOT met'})")
        results["models"].setdefault(family, {}).update({"rows": rows, "targets": [
            {"target": w, "value": v, "met": ok} for w, v, ok in targets]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.litertlm_only and (RESULTS / "tflite.json").is_file():  # the other rows stay as they were
        kept = json.loads((RESULTS / "tflite.json").read_text())
        for family, entry in results["models"].items():
            kept.setdefault("models", {}).setdefault(family, {}).update(entry)
        results = kept
    (RESULTS / "tflite.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'tflite.json'}")


if __name__ == "__main__":
    main()
