"""Many generations at once: `lmstack serve`'s step scheduler against request-level batching and in-process loops.

For the transformer and the LSTM at the `small` preset (char tokenizer on the bundled
corpus; untrained weights, whose [EOS] greedy decoding never picks, so every request makes
the tokens it asks for), two `lmstack serve`
processes, both on the documented fast path (`--xla_cpu_compilation_enabled`,
`--tensorflow_intra_op_parallelism=1`):

- `steps`: continuous batching (the default): a pool of cache slots, one decoding
  call for every active sequence, finished ones leaving and new ones joining
  between calls;
- `requests`: `--continuous_batching=false --enable_batching` with TF Serving's
  batching file (`max_batch_size` 16, `batch_timeout_micros` 5000, 2 batch threads):
  what lmstack served before, each merged batch running for its longest member.

Measured as the user meets them, over REST with lmstack's client:

1. **16 concurrent clients**, greedy `serving_default_xla`, asking for 8, 32, 96 and 16
   new tokens in turn: new tokens per second of the requests completed within a
   `--seconds` window (the windows of the two servers alternate, `--rounds` times). The
   reference is a user's best with no server, in this process, at batch 16: keras-hub's
   compiled `GPT2CausalLM.generate` on a GPT-2 of the same shape (transformer), lmstack's
   own compiled loop (LSTM); 16 and 80 new tokens, differenced, so only the decoding
   loop's rate is left.
2. **Time to first token** of a stream (`:stream`, 96 new tokens), alone and while 16
   streams run at once (p50 of the loaded ones).
3. **One client**: new tokens/s of a stream and of a unary call of the same length (16 and
   80 new tokens, differenced), and of a unary call on each server.

Prints a table and writes bench/results/concurrent_generation.json.

usage: python bench/concurrent_generation.py [--seconds=15] [--rounds=3] [--families=transformer,lstm]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
PROMPT = "ROMEO.\nWhat light through"  # 24 tokens: with 96 new ones inside the context of 128
LENGTHS = (8, 32, 96, 16)
CLIENTS = 16
SHORT, LONG = 16, 80
FAST = ("--xla_cpu_compilation_enabled", "--tensorflow_intra_op_parallelism=1", "--rest_api_num_threads=48")
BATCHING = "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 5000 }\nnum_batch_threads { value: 2 }\n"


def load_window(target: str, seconds: float) -> dict:
    """16 clients for `seconds`: new tokens/s of the requests that completed in the window."""
    from serving import client as client_lib
    from serving import contract as c

    stop = time.perf_counter() + seconds
    tokens, requests, errors = [0] * CLIENTS, [0] * CLIENTS, []

    def client(i: int) -> None:
        conn = client_lib.connect(target, "rest", timeout=600)
        turn = i
        while True:
            new = LENGTHS[turn % len(LENGTHS)]
            turn += 1
            try:
                out = conn.predict(c.SERVING_DEFAULT_XLA, {c.PROMPT: [PROMPT], c.MAX_NEW_TOKENS: [new]})
            except Exception as e:  # counted, not raised: the table shows them
                errors.append(repr(e)[:200])
                return
            if time.perf_counter() > stop:
                return
            tokens[i] += int(np.count_nonzero(out[c.TOKEN_IDS]))
            requests[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tokens_per_s": sum(tokens) / seconds, "requests": sum(requests), "errors": errors}


def first_token(target: str, streams: int, new: int = 96) -> list[float]:
    """Seconds to each stream's first token, `streams` at once (each reads its stream to the end)."""
    from serving import client as client_lib
    from serving import contract as c

    ttft: list[float] = []
    barrier = threading.Barrier(streams)

    def one() -> None:
        conn = client_lib.connect(target, "rest", timeout=600)
        barrier.wait()
        for _ in range(3):
            start = time.perf_counter()
            chunks = conn._stream({c.PROMPT: PROMPT, c.MAX_NEW_TOKENS: new})
            next(chunks)
            ttft.append(time.perf_counter() - start)
            for _ in chunks:
                pass

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttft


def one_client_rates(target: str, rounds: int) -> dict:
    """A stream's and a unary call's new tokens/s at one client (16 and 80 tokens, differenced)."""
    from serving import client as client_lib
    from serving import contract as c

    conn = client_lib.connect(target, "rest", timeout=600)

    def unary(new):
        out = conn.predict(c.SERVING_DEFAULT_XLA, {c.PROMPT: [PROMPT], c.MAX_NEW_TOKENS: [new]})
        return int(np.count_nonzero(out[c.TOKEN_IDS]))

    def stream(new):
        return sum(len(e.get("token_ids", ())) for e in conn._stream({c.PROMPT: PROMPT, c.MAX_NEW_TOKENS: new}))

    rates: dict[str, list[float]] = {"unary": [], "stream": []}
    for fn in (unary, stream):
        fn(SHORT)
    for _ in range(rounds):
        for name, fn in (("unary", unary), ("stream", stream)):
            t0 = time.perf_counter()
            short = fn(SHORT)
            t1 = time.perf_counter()
            long = fn(LONG)
            t2 = time.perf_counter()
            rates[name].append((long - short) / ((t2 - t1) - (t1 - t0)))
    return {k: statistics.median(v) for k, v in rates.items()}


def reference(family: str, workdir: pathlib.Path, rounds: int) -> float:
    """A user's best with no server at batch 16, new tokens/s of the decoding loop (differenced)."""
    from pipelines.generate import TextGenerator

    generator = TextGenerator(workdir)
    prompt_ids = generator.prompt_ids(PROMPT)
    if family == "transformer":
        import keras_hub

        import models

        cfg = models.make_config("transformer", "small", vocab_size=generator.tokenizer.vocabulary_size())
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=cfg.vocab_size, num_layers=cfg.layers, num_heads=cfg.heads, hidden_dim=cfg.d_model,
            intermediate_dim=cfg.mlp_ratio * cfg.d_model, dropout=0.0, max_sequence_length=cfg.seq_len)
        lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        lm.compile(sampler="greedy", jit_compile=True)

        def run(new):
            padded = np.zeros([CLIENTS, len(prompt_ids) + new], np.int32)
            padded[:, :len(prompt_ids)] = prompt_ids
            mask = np.zeros_like(padded, bool)
            mask[:, :len(prompt_ids)] = True
            lm.generate({"token_ids": padded, "padding_mask": mask}, stop_token_ids=None)
            return CLIENTS * new
    else:
        from models import samplers

        def run(new):
            return sum(map(len, generator.generator.generate([prompt_ids] * CLIENTS, new, samplers.SamplerConfig())))
    run(SHORT), run(LONG)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        short = run(SHORT)
        t1 = time.perf_counter()
        long = run(LONG)
        t2 = time.perf_counter()
        rates.append((long - short) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--families", default="transformer,lstm")
    args = parser.parse_args()

    import app  # noqa: F401
    import tensorflow as tf

    from bench.common import Server, untrained_export

    root = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-concurrent-"))
    (root / "batching.txt").write_text(BATCHING)
    results = []
    for family in args.families.split(","):
        workdir, version = untrained_export(root, family, "small", never_eos=True)
        base = f"--model_base_path={version.parent}"
        servers = {"steps": Server(base, *FAST, log=root / f"{family}-steps.log"),
                   "requests": Server(base, *FAST, "--continuous_batching=false", "--enable_batching",
                                      f"--batching_parameters_file={root / 'batching.txt'}",
                                      log=root / f"{family}-requests.log")}
        try:
            row: dict = {"model": family, "load": {}, "rounds": {k: [] for k in servers}}
            for name, server in servers.items():
                row["load"][name] = round(server.ready_seconds, 1)
                load_window(server.target("rest"), 2)  # connections and every path warm
            for r in range(args.rounds):
                for name, server in servers.items():
                    window = load_window(server.target("rest"), args.seconds)
                    row["rounds"][name].append(window)
                    print(f"{family} round {r + 1}: {name} {window['tokens_per_s']:.0f} tokens/s "
                          f"({window['requests']} requests, {len(window['errors'])} errors)", file=sys.stderr)
            for name in servers:
                row[f"{name}_tokens_per_s"] = round(statistics.median(w["tokens_per_s"] for w in row["rounds"][name]))
            row["errors"] = sum(len(w["errors"]) for ws in row["rounds"].values() for w in ws)
            for name, server in servers.items():
                target = server.target("rest")
                alone = statistics.median(first_token(target, 1))
                loaded = statistics.median(first_token(target, CLIENTS))
                row[f"{name}_ttft_ms"] = {"alone": round(alone * 1e3, 1), "16_streams_p50": round(loaded * 1e3, 1)}
                row[f"{name}_one_client"] = {k: round(v) for k, v in one_client_rates(target, args.rounds).items()}
        finally:
            for server in servers.values():
                server.stop()
        row["reference"] = ("keras-hub GPT2CausalLM.generate, jit_compile" if family == "transformer"
                            else "lmstack in-process compiled loop") + f", batch {CLIENTS}"
        row["reference_tokens_per_s"] = round(reference(family, workdir, args.rounds))
        row["steps_vs_reference"] = round(row["steps_tokens_per_s"] / row["reference_tokens_per_s"], 2)
        row["steps_vs_requests"] = round(row["steps_tokens_per_s"] / row["requests_tokens_per_s"], 2)
        results.append(row)

    print(f"\n{'model':12} {'steps tok/s':>12} {'requests tok/s':>15} {'reference':>10} {'vs ref':>7} "
          f"{'vs requests':>12} {'TTFT alone':>11} {'TTFT 16':>8} {'stream/unary':>13} {'errors':>7}")
    for r in results:
        one = r["steps_one_client"]
        print(f"{r['model']:12} {r['steps_tokens_per_s']:12} {r['requests_tokens_per_s']:15} "
              f"{r['reference_tokens_per_s']:10} {r['steps_vs_reference']:7.2f} {r['steps_vs_requests']:12.2f} "
              f"{r['steps_ttft_ms']['alone']:11} {r['steps_ttft_ms']['16_streams_p50']:8} "
              f"{one['stream'] / one['unary']:13.2f} {r['errors']:7}")
        old = r["requests_one_client"]
        print(f"  one client unary: steps {one['unary']} tok/s, requests {old['unary']} tok/s; "
              f"request-level TTFT alone {r['requests_ttft_ms']['alone']} ms, "
              f"16 streams {r['requests_ttft_ms']['16_streams_p50']} ms")
    result = {"benchmark": "concurrent_generation", "prompt": PROMPT, "lengths": LENGTHS, "clients": CLIENTS,
              "seconds": args.seconds, "rounds": args.rounds, "server_flags": list(FAST), "batching": BATCHING,
              "rows": results,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "concurrent_generation.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/concurrent_generation.json")


if __name__ == "__main__":
    main()
