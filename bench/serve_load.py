"""Server load: throughput, p50/p99 latency and resident memory of `lmstack serve`, batching off and on.

A `tiny` transformer (char tokenizer on the bundled corpus) is exported and
served by two `lmstack serve` processes side by side, one with batching
(`max_batch_size` 32, `batch_timeout_micros` 5000, 2 batch threads) and one
without, both with one thread per op (`THREADS`). N concurrent clients
(threads of this process, each with its own connection and prebuilt requests)
send `serving_default` requests of one prompt (16 new tokens) over gRPC or
REST. Each row (protocol x 1 or 32 clients) runs `--rounds` pairs of
`--seconds` windows, batching off then on, so every on-window has an
off-window next to it in time: "vs off" is the median of those per-pair
ratios (these machines are shared and their speed drifts between minutes).

The reference is the same signature called in-process (`tf.saved_model.load`,
the same threading) in this process. The protocol overhead is the median
difference between a server call and an in-process call made one after the
other, 80 pairs at one client (batching off). The server's resident memory is
read from /proc with one loaded version and with two (a
`model_version_policy { all {} }` config over two versions), and before and
after the largest requests the default limits allow (`score` on 8 texts of
8 KiB: the 64 KiB of `--max_text_bytes`), once and then ten more times: what
one large request leaves behind, and whether it keeps growing.

Both servers run `--rest_api_num_threads=32`, one REST worker per client
(TF Serving's default is 4 per CPU: 8 here, which caps a REST batch at 8).

The request-log rows: two batching servers side by side, each from a model config file, one
whose model has a `logging_config` at sampling rate 1 (every request and response written as a
PredictionLog TFRecord) and one without; windows alternate between them as above, and "vs off"
is the logging server's throughput (and p99) over the other's. `--logging_only` runs just these
rows and merges them into an existing serve_load.json.

Prints a table and writes bench/results/serve_load.json.

usage: python bench/serve_load.py [--seconds=4] [--rounds=3] [--logging_only]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
PROMPTS = ["ROMEO.", "What light through yonder window", "To be, or not to be", "Enter HAMLET", "Good night"]
NEW_TOKENS = 15  # the most the `tiny` preset's context of 16 takes (16 before its context shrank)
# One thread per op: a model this small gains nothing from splitting an op
# across cores, and the freed core runs another request or batch (in-process,
# a batch of 32 runs 1.8x the rows/s of TensorFlow's default threading here).
INTRA_OP, INTER_OP = 1, 2
THREADS = (f"--tensorflow_intra_op_parallelism={INTRA_OP}", f"--tensorflow_inter_op_parallelism={INTER_OP}",
           "--rest_api_num_threads=32")
LARGE_TEXT = ("To be, or not to be, that is the question: " * 200)[:8192]  # 8 texts: --max_text_bytes


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _request_senders(target: str, protocol: str):
    """A factory of per-client `send(i)` functions with the requests built beforehand.

    The load generator shares the machine with the server, so it keeps its own
    work per request small: prebuilt protos / JSON bodies, one connection per
    client (HTTP keep-alive for REST), the raw stub for gRPC.
    """
    if protocol == "grpc":
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

        requests = []
        for p in PROMPTS:
            r = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="lm"))
            r.inputs["prompt"].CopyFrom(tf.make_tensor_proto([p]))
            r.inputs["max_new_tokens"].CopyFrom(tf.make_tensor_proto([NEW_TOKENS], dtype=tf.int32))
            requests.append(r)

        def make():
            stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))
            return lambda i: stub.Predict(requests[i % len(requests)], timeout=60)
        return make
    import http.client

    host, port = target.split(":")
    bodies = [json.dumps({"inputs": {"prompt": [p], "max_new_tokens": [NEW_TOKENS]}}).encode() for p in PROMPTS]

    def make():
        connection = http.client.HTTPConnection(host, int(port), timeout=60)

        def send(i):
            connection.request("POST", "/v1/models/lm:predict", bodies[i % len(bodies)],
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(data[:200])
        return send
    return make


def load(target: str, protocol: str, clients: int, seconds: float) -> dict:
    """`clients` threads sending back-to-back requests for `seconds`; throughput and latency."""
    make = _request_senders(target, protocol)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:
        send = make()
        n = i
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                send(n)
            except Exception:  # counted; the benchmark reports failures
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
            n += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors[0], "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def large_request_memory(server) -> dict:
    """Server RSS before, after one and after eleven `score` requests of --max_text_bytes of text."""
    from serving import client

    rest = client.connect(server.target("rest"), "rest", timeout=120)
    rest.score(["To be"])
    before = rss_mb(server.process.pid)
    rest.score([LARGE_TEXT] * 8)
    after_one = rss_mb(server.process.pid)
    for _ in range(10):
        rest.score([LARGE_TEXT] * 8)
    return {"before": before, "after_one": after_one, "after_eleven": rss_mb(server.process.pid)}


def paired_overhead(fn, server, reps: int = 80) -> dict:
    """p50 of (remote - in-process) latency over interleaved pairs of calls: the protocol's own cost."""
    import tensorflow as tf

    senders = {protocol: _request_senders(server.target(protocol), protocol)() for protocol in ("grpc", "rest")}
    differences: dict[str, list[float]] = {name: [] for name in senders}
    for i in range(reps + 5):
        start = time.perf_counter()
        fn(prompt=tf.constant([PROMPTS[i % len(PROMPTS)]]), max_new_tokens=tf.constant([NEW_TOKENS]))
        local = time.perf_counter() - start
        for name, send in senders.items():
            start = time.perf_counter()
            send(i)
            if i >= 5:  # the first calls open connections
                differences[name].append((time.perf_counter() - start - local) * 1000)
    return {name: float(np.median(d)) for name, d in differences.items()}


def paired_windows(servers: dict, rounds: int, seconds: float, what: str) -> dict[tuple, list[dict]]:
    """Load windows alternating between two servers ({False: without `what`, True: with it}), so each
    window has one of the other beside it in time: (protocol, with, clients) -> its windows."""
    windows: dict[tuple, list[dict]] = {}
    for protocol in ("grpc", "rest"):
        for server in servers.values():
            load(server.target(protocol), protocol, 4, 1.0)  # warm connections and the batch shapes
        for clients in (1, 32):
            for r in range(rounds):
                for flag, server in servers.items():
                    window = load(server.target(protocol), protocol, clients, seconds)
                    window["server_rss_mb"] = rss_mb(server.process.pid)
                    windows.setdefault((protocol, flag, clients), []).append(window)
                on, off = (windows[(protocol, b, clients)][-1]["requests_per_s"] for b in (True, False))
                print(f"{protocol} clients={clients} round {r + 1}: {what} off {off:.1f} req/s, on {on:.1f} req/s "
                      f"({on / off:.3f}x)", file=sys.stderr)
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one load window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating off/on windows per row")
    parser.add_argument("--logging_only", action="store_true", help="only the request-log rows (merged into "
                        "bench/results/serve_load.json)")
    args = parser.parse_args()

    import app  # noqa: F401
    import tensorflow as tf

    from bench.common import Server, untrained_export

    # The servers' threading for the in-process reference too.
    tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP)
    tf.config.threading.set_inter_op_parallelism_threads(INTER_OP)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmstack-serve-bench-"))
    base = tmp / "models" / "lm"
    _, version = untrained_export(tmp, "transformer", "tiny", export_base=str(base))
    batching_file = tmp / "batching.txt"
    batching_file.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 5000 }\n"
                             "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n")
    logging_rows = request_log_rows(Server, tmp, base, batching_file, args)
    if args.logging_only:
        path = RESULTS / "serve_load.json"
        result = json.loads(path.read_text()) if path.is_file() else {"benchmark": "serve_load"}
        result["request_log_rows"] = logging_rows
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print_request_log_rows(logging_rows)
        print("wrote bench/results/serve_load.json (request_log_rows)")
        return

    # The reference: the same signature in-process, batch 1.
    loaded = tf.saved_model.load(str(version))
    fn = loaded.signatures["serving_default"]
    for _ in range(3):
        fn(prompt=tf.constant([PROMPTS[0]]), max_new_tokens=tf.constant([NEW_TOKENS]))
    in_process = []
    for i in range(60):
        start = time.perf_counter()
        fn(prompt=tf.constant([PROMPTS[i % len(PROMPTS)]]), max_new_tokens=tf.constant([NEW_TOKENS]))
        in_process.append((time.perf_counter() - start) * 1000)
    reference = {"p50_ms": float(np.percentile(in_process, 50)), "p99_ms": float(np.percentile(in_process, 99)),
                 "requests_per_s": 1000 / float(np.mean(in_process))}
    # The ceiling batching aims at: one in-process call of 32 prompts.
    prompts32 = tf.constant([PROMPTS[i % len(PROMPTS)] for i in range(32)])
    fn(prompt=prompts32, max_new_tokens=tf.fill([32], NEW_TOKENS))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        fn(prompt=prompts32, max_new_tokens=tf.fill([32], NEW_TOKENS))
        times.append(time.perf_counter() - start)
    reference["batch32_rows_per_s"] = 32 / float(np.median(times))
    print(f"in-process: p50 {reference['p50_ms']:.2f} ms", file=sys.stderr)

    flags = [f"--model_base_path={base}", "--model_name=lm", *THREADS]
    # Both servers run side by side; load windows alternate between them, so
    # each batching-on window has a batching-off window next to it in time.
    servers = {False: Server(*flags), True: Server(*flags, "--enable_batching",
                                                   f"--batching_parameters_file={batching_file}")}
    try:
        memory = large_request_memory(servers[False])
        overhead = paired_overhead(fn, servers[False])
        windows = paired_windows(servers, args.rounds, args.seconds, "batching")
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for (protocol, batching, clients), runs in windows.items():
        row = {"protocol": protocol, "batching": batching, "clients": clients,
               **{k: float(np.median([w[k] for w in runs])) for k in runs[0] if k != "errors"},
               "errors": sum(w["errors"] for w in runs), "rounds": len(runs)}
        off = windows[(protocol, False, clients)]
        # Per round: this window's throughput over the batching-off window beside it.
        row["vs_unbatched"] = float(np.median([w["requests_per_s"] / o["requests_per_s"] for w, o in zip(runs, off)]))
        rows.append(row)

    # Memory with two loaded versions.
    shutil.copytree(version, base / "2")
    two = tmp / "two.config"
    two.write_text(f'model_config_list {{ config {{ name: "lm" base_path: "{base}" '
                   f'model_version_policy {{ all {{}} }} }} }}')
    server = Server(f"--model_config_file={two}", *THREADS)
    try:
        load(server.target("grpc"), "grpc", 4, 1.0)
        rss_two = rss_mb(server.process.pid)
    finally:
        server.stop()

    for row in rows:
        row["p50_over_in_process_ms"] = row["p50_ms"] - reference["p50_ms"]
    result = {"benchmark": "serve_load", "seconds": args.seconds, "rounds": args.rounds,
              "server_flags": list(THREADS), "new_tokens": NEW_TOKENS, "preset": "tiny",
              "in_process": reference, "p50_overhead_ms_paired": overhead, "server_rss_mb_two_versions": rss_two,
              "large_request_rss_mb": memory, "request_log_rows": logging_rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    print(f"{'protocol':8} {'batching':8} {'clients':>7} {'req/s':>8} {'vs off':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50 - in-proc':>13} {'RSS MB':>7} {'errors':>6}")
    print(f"{'in-proc':8} {'-':8} {1:7} {reference['requests_per_s']:8.1f} {'':>7} {reference['p50_ms']:8.2f} "
          f"{reference['p99_ms']:8.2f} {'':>13} {'':>7}")
    for r in rows:
        print(f"{r['protocol']:8} {str(r['batching']):8} {r['clients']:7} {r['requests_per_s']:8.1f} "
              f"{r['vs_unbatched']:6.2f}x {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['p50_over_in_process_ms']:13.2f} "
              f"{r['server_rss_mb']:7.0f} {r['errors']:6}")
    print(f"protocol overhead, p50 of paired (server - in-process) calls at 1 client: "
          f"gRPC {overhead['grpc']:.2f} ms, REST {overhead['rest']:.2f} ms")
    print(f"server RSS around the largest requests the limits allow: {memory['before']:.0f} MB before, "
          f"{memory['after_one']:.0f} MB after one, {memory['after_eleven']:.0f} MB after eleven")
    print(f"server RSS with two versions loaded: {rss_two:.0f} MB; in-process batch of 32: "
          f"{reference['batch32_rows_per_s']:.0f} rows/s")
    print_request_log_rows(logging_rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    print("wrote bench/results/serve_load.json")


def request_log_rows(server_class, tmp: pathlib.Path, base: pathlib.Path, batching_file: pathlib.Path,
                     args) -> list[dict]:
    """Throughput and p99 with every request logged (sampling rate 1) against no logging, paired."""
    logs = tmp / "logs"
    configs = {}
    for logging in (False, True):
        config = tmp / f"models-{'logged' if logging else 'plain'}.config"
        extra = (f'logging_config {{ log_collector_config {{ type: "tfrecord" filename_prefix: "{logs}/lm" }} '
                 f'sampling_config {{ sampling_rate: 1.0 }} }}') if logging else ""
        config.write_text(f'model_config_list {{ config {{ name: "lm" base_path: "{base}" {extra} }} }}')
        configs[logging] = config
    servers = {logging: server_class(f"--model_config_file={configs[logging]}", *THREADS, "--enable_batching",
                                     f"--batching_parameters_file={batching_file}") for logging in (False, True)}
    try:
        windows = paired_windows(servers, args.rounds, args.seconds, "logging")
    finally:
        for server in servers.values():
            server.stop()
    import tensorflow as tf

    records = sum(1 for _ in tf.data.TFRecordDataset(tf.io.gfile.glob(f"{logs}/lm-*.tfrecord")))
    sent = sum(w["requests"] for (_, logging, _), runs in windows.items() if logging for w in runs)
    rows = []
    for protocol, clients in sorted({(p, c) for p, _, c in windows}):
        on, off = windows[(protocol, True, clients)], windows[(protocol, False, clients)]
        rows.append({"protocol": protocol, "clients": clients, "rounds": len(on),
                     "requests_per_s_logged": float(np.median([w["requests_per_s"] for w in on])),
                     "requests_per_s_plain": float(np.median([w["requests_per_s"] for w in off])),
                     "throughput_vs_plain": float(np.median([a["requests_per_s"] / b["requests_per_s"]
                                                             for a, b in zip(on, off)])),
                     "p99_vs_plain": float(np.median([a["p99_ms"] / b["p99_ms"] for a, b in zip(on, off)])),
                     "errors": sum(w["errors"] for w in on + off)})
    rows.append({"records_written": records, "requests_answered_logged": sent})
    return rows


def print_request_log_rows(rows: list[dict]) -> None:
    print(f"{'protocol':8} {'clients':>7} {'logged req/s':>12} {'plain req/s':>11} {'throughput':>10} {'p99':>6}")
    for r in rows[:-1]:
        print(f"{r['protocol']:8} {r['clients']:7} {r['requests_per_s_logged']:12.1f} "
              f"{r['requests_per_s_plain']:11.1f} {r['throughput_vs_plain']:9.3f}x {r['p99_vs_plain']:5.2f}x")
    print(f"request log records written: {rows[-1]['records_written']} of {rows[-1]['requests_answered_logged']} "
          "requests answered in the measured windows (the others: its warm-up requests)")


if __name__ == "__main__":
    main()
