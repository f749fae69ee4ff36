"""What the OpenAI-compatible API costs: the same generations over `/v1/completions` and over TF Serving's REST routes.

One `lmstack serve` process on the documented fast path (`--xla_cpu_compilation_enabled`,
`--tensorflow_intra_op_parallelism=1`) with `--openai_api_port`, serving the `small`
transformer (char tokenizer on the bundled corpus; untrained weights, whose [EOS] greedy
decoding never picks, so every request makes the tokens it asks for). Greedy, the same prompt;
the OpenAI side with the official `openai` client, the TF Serving side with lmstack's REST client:

1. **Time to first token** of a stream: the OpenAI stream's first text chunk against the REST
   `:stream` route's first event (96 new tokens), alternating, median of `--rounds` x 5.
2. **New tokens/s at one client** (16 and 80 new tokens, differenced, so start-up and the
   prompt cancel): the OpenAI stream, an OpenAI unary completion, the REST `:stream` route, and
   Predict on `serving_default_xla` (unary).
3. **16 concurrent clients**, 32 new tokens each request: OpenAI unary completions against
   Predict, windows of `--seconds` alternating, `--rounds` times.

Each OpenAI figure is measured twice: with the official `openai` client (what a user meets; its
own cost, httpx and pydantic, runs on the same 2 cores as the server) and with plain HTTP on one
kept-alive connection (the server's layer alone). The OpenAI layer's cost is the plain-HTTP
figure against its TF Serving twin (target: under 5 %).
Prints a table and writes bench/results/openai_api.json.

usage: python bench/openai_api.py [--seconds=10] [--rounds=3]
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
SHORT, LONG = 16, 80
CLIENTS, LOAD_TOKENS = 16, 32
FAST = ("--xla_cpu_compilation_enabled", "--tensorflow_intra_op_parallelism=1", "--rest_api_num_threads=48")


class Apis:
    """The four ways to ask the one server for `new` greedy tokens; each returns the tokens made."""

    def __init__(self, rest_target: str, openai_port: int):
        import openai

        from serving import client as client_lib

        self.rest = client_lib.connect(rest_target, "rest", timeout=600)
        self.port = openai_port
        self._http = None
        self.openai = openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused", max_retries=0,
                                    timeout=600)

    def openai_unary(self, new: int) -> int:
        return self.openai.completions.create(model="lm", prompt=PROMPT, max_tokens=new,
                                              temperature=0).usage.completion_tokens

    def openai_stream(self, new: int, first: list | None = None) -> int:
        began, tokens = time.perf_counter(), 0
        for chunk in self.openai.completions.create(model="lm", prompt=PROMPT, max_tokens=new, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if first is not None and not first and chunk.choices and chunk.choices[0].text:
                first.append(time.perf_counter() - began)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    def _post(self, body: dict):
        """The OpenAI route with no client library: one kept-alive HTTP connection, json.loads."""
        import http.client

        if self._http is None:
            self._http = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        self._http.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        return self._http.getresponse()

    def raw_unary(self, new: int) -> int:
        body = {"model": "lm", "prompt": PROMPT, "max_tokens": new, "temperature": 0}
        return json.loads(self._post(body).read())["usage"]["completion_tokens"]

    def raw_stream(self, new: int, first: list | None = None) -> int:
        began, tokens = time.perf_counter(), 0
        response = self._post({"model": "lm", "prompt": PROMPT, "max_tokens": new, "temperature": 0, "stream": True,
                               "stream_options": {"include_usage": True}})
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is not None and not first and chunk["choices"] and chunk["choices"][0]["text"]:
                first.append(time.perf_counter() - began)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return tokens

    def rest_unary(self, new: int) -> int:
        from serving import contract as c

        out = self.rest.predict(c.SERVING_DEFAULT_XLA, {c.PROMPT: [PROMPT], c.MAX_NEW_TOKENS: [new]})
        return int(np.count_nonzero(out[c.TOKEN_IDS]))

    def rest_stream(self, new: int, first: list | None = None) -> int:
        from serving import contract as c

        began, tokens = time.perf_counter(), 0
        for event in self.rest._stream({c.PROMPT: PROMPT, c.MAX_NEW_TOKENS: new}):
            if first is not None and not first and event.get("token_ids"):
                first.append(time.perf_counter() - began)
            tokens += len(event.get("token_ids", ()))
        return tokens


def first_tokens(apis: Apis, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"openai": [], "raw": [], "rest": []}
    for _ in range(rounds * 5):
        for name, fn in (("openai", apis.openai_stream), ("raw", apis.raw_stream), ("rest", apis.rest_stream)):
            first: list[float] = []
            fn(96, first)
            times[name].append(first[0])
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def rates(apis: Apis, rounds: int) -> dict[str, float]:
    ways = {"openai_stream": apis.openai_stream, "openai_unary": apis.openai_unary, "raw_stream": apis.raw_stream,
            "raw_unary": apis.raw_unary, "rest_stream": apis.rest_stream, "rest_unary": apis.rest_unary}
    for fn in ways.values():
        fn(SHORT)
    found: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            short = fn(SHORT)
            t1 = time.perf_counter()
            long = fn(LONG)
            t2 = time.perf_counter()
            found[name].append((long - short) / ((t2 - t1) - (t1 - t0)))
    return {k: statistics.median(v) for k, v in found.items()}


def load_window(make, seconds: float) -> float:
    """New tokens/s of the requests `CLIENTS` clients completed within `seconds`."""
    stop = time.perf_counter() + seconds
    tokens = [0] * CLIENTS

    def client(i: int) -> None:
        ask = make()
        while True:
            made = ask(LOAD_TOKENS)
            if time.perf_counter() > stop:
                return
            tokens[i] += made

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import app  # noqa: F401
    import tensorflow as tf

    from bench.common import Server, untrained_export
    from pipelines.launch import free_ports

    root = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-openai-"))
    _, version = untrained_export(root, "transformer", "small", never_eos=True)
    (openai_port,) = free_ports(1)
    served = Server(f"--model_base_path={version.parent}", *FAST, f"--openai_api_port={openai_port}",
                    log=root / "serve.log")
    try:
        make = lambda: Apis(served.target("rest"), openai_port)
        apis = make()
        ttft = first_tokens(apis, args.rounds)
        one = rates(apis, args.rounds)
        load: dict[str, list[float]] = {"openai": [], "raw": [], "rest": []}
        load_window(lambda: make().openai_unary, 2)  # connections and paths warm
        for r in range(args.rounds):
            for name in load:
                window = load_window(lambda way=f"{name}_unary": getattr(make(), way), args.seconds)
                load[name].append(window)
                print(f"round {r + 1}: {name} {window:.0f} tokens/s at {CLIENTS} clients", file=sys.stderr)
    finally:
        served.stop()
    concurrent = {k: statistics.median(v) for k, v in load.items()}
    rows = [
        ("time to first token, ms", ttft, "REST :stream"),
        ("stream, new tokens/s", {k: one[f"{k}_stream"] for k in ttft}, "REST :stream"),
        ("unary, new tokens/s", {k: one[f"{k}_unary"] for k in ttft}, "Predict serving_default_xla"),
        (f"{CLIENTS} clients, new tokens/s", concurrent, "Predict serving_default_xla"),
    ]
    print(f"\n{'measure':28} {'openai client':>14} {'raw HTTP':>9} {'TF Serving':>11} {'cost':>7} "
          f"{'raw cost':>9}  against")
    table = []
    for what, figures, against in rows:
        # A time costs when it grows; a rate when it shrinks.
        cost = {k: figures[k] / figures["rest"] - 1 if "ms" in what else 1 - figures[k] / figures["rest"]
                for k in ("openai", "raw")}
        table.append({"measure": what, "openai_client": round(figures["openai"], 1),
                      "raw_http": round(figures["raw"], 1), "tf_serving": round(figures["rest"], 1),
                      "cost": round(cost["openai"], 3),
                      "raw_cost": round(cost["raw"], 3), "against": against})
        print(f"{what:28} {figures['openai']:14.1f} {figures['raw']:9.1f} {figures['rest']:11.1f} "
              f"{cost['openai']:7.1%} {cost['raw']:9.1%}  {against}")
    result = {"benchmark": "openai_api", "prompt": PROMPT, "short_long": [SHORT, LONG], "clients": CLIENTS,
              "load_tokens": LOAD_TOKENS, "seconds": args.seconds, "rounds": args.rounds,
              "server_flags": list(FAST), "rows": table, "load_windows": load,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "openai_api.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/openai_api.json")


if __name__ == "__main__":
    main()
