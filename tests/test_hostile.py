"""`lmstack serve` under hostile traffic: what a careless or malicious client can send, on 127.0.0.1.

Each test sends what the TensorFlow Serving API lets a client send —
oversized work, impossible shapes, bad framing, abandoned requests, forged
metric labels — and checks the answer TensorFlow Serving would give, that
neighbouring requests are untouched, and that the work stops.
"""

import json
import os
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_pb2

from serving.server import batching
from serving import contract as c
from serving import server
from tests.serving_wire import post, predict_request, raw_http, stub

LIMITS = server.Limits(max_request_bytes=1 << 20, max_request_rows=32, max_tensor_elements=4096,
                       max_text_bytes=2048, max_new_tokens=100_000)


@pytest.fixture(scope="module")
def running(served_bases):
    """A server with batching and metrics on, bound to 127.0.0.1, with small limits."""
    core = server.ModelServer(
        {f: server.ServedModel(f, served_bases / f) for f in ("transformer", "lstm")},
        batching=batching.BatchingParameters(max_batch_size=8, batch_timeout_micros=20_000, num_batch_threads=2),
        metrics_path=server.DEFAULT_METRICS_PATH, limits=LIMITS)
    core.refresh()
    grpc_server, grpc_port = server.start_grpc(core, 0, host="127.0.0.1", health=True)
    rest_server, rest_port = server.start_rest(core, 0, host="127.0.0.1", threads=8, timeout=2.0, idle_timeout=2)
    yield {"core": core, "grpc": f"127.0.0.1:{grpc_port}", "rest": ("127.0.0.1", rest_port)}
    rest_server.shutdown()
    grpc_server.stop(None)
    core.batcher.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


GENERATE = "/v1/models/lstm:predict"


@pytest.mark.parametrize("body, message", [
    ({"inputs": {"prompt": ["x"] * 33, "max_new_tokens": [1] * 33}}, "at most 32 (--max_request_rows)"),
    ({"inputs": {"prompt": ["x" * 3000], "max_new_tokens": [1]}}, "at most 2048 (--max_text_bytes)"),
    ({"inputs": {"prompt": ["x"], "max_new_tokens": [100_001]}}, "between 0 and 100000"),
    ({"inputs": {"prompt": ["x"], "max_new_tokens": [-1]}}, "between 0 and 100000"),
    ({"inputs": {"prompt": ["x"], "max_new_tokens": [4294967297]}}, "outside int32's range"),
    ({"signature_name": "score", "inputs": {"text": [["x"] * 65] * 65}}, "more than 4096 elements"),
    ({"inputs": {"prompt": ["x", "y"], "max_new_tokens": [1, 2, 3]}}, "share their first (batch) dimension"),
    ({"inputs": {"prompt": ["x"], "max_new_tokens": [[1], 2]}}, "mixes values and lists"),
    ({"inputs": {"prompt": [["x", "y"], ["z"]], "max_new_tokens": [1]}}, "ragged"),
    ({"inputs": {"prompt": [{"b64": "not base64!"}], "max_new_tokens": [1]}}, "not valid base64"),
    ({"inputs": {"prompt": [None], "max_new_tokens": [1]}}, "null is not a tensor value"),
    ({"signature_name": ["score"], "inputs": {"text": ["x"]}}, "'signature_name' must be a string"),
    ({"inputs": {"prompt": ["x"], "max_new_tokens": [1.5]}}, "fractional"),
])
def test_rest_refuses_bad_and_oversized_work_with_400(running, body, message, caplog):
    status, answer = post(running["rest"], GENERATE, body)
    assert status == 400 and message in answer["error"], answer
    assert "Traceback" not in caplog.text


def test_deep_nesting_and_garbage_are_400_not_a_dropped_connection(running):
    for data in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
                 b"\xff\xfe not json", b"[1, 2]"):
        status, reply, _ = raw_http(running["rest"], b"POST " + GENERATE.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                    + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        assert status == 400 and json.loads(reply)["error"]


@pytest.mark.parametrize("header, status", [("Content-Length: -1", 400), ("Content-Length: abc", 400),
                                            ("Content-Length: 2000000", 413),
                                            ("Transfer-Encoding: gzip, chunked", 501)])
def test_http_framing_is_strict(running, header, status):
    got, body, closed = raw_http(running["rest"], f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n{{}}"
                                 .encode())
    assert got == status and closed  # the body that follows cannot be trusted: the connection closes
    assert json.loads(body)["error"]


def test_chunked_bodies_are_read_as_one_request_not_smuggled(running):
    body = json.dumps({"signature_name": "score", "inputs": {"text": ["To be"]}}).encode()
    chunks = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:7], body[7:])) + b"0\r\n\r\n"
    smuggled = b"GET /v1/models/nope HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(running["rest"], timeout=10) as s:
        s.sendall(b"POST /v1/models/transformer:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunks + smuggled)
        replies = b""
        while replies.count(b"HTTP/1.1 ") < 2 or not replies.endswith(b"}"):
            replies += s.recv(65536)
    first, second = replies.split(b"HTTP/1.1 ")[1:]
    # The chunked body is one request, answered in full; what follows it is a request of its own.
    assert first.startswith(b"200") and json.loads(first.split(b"\r\n\r\n")[1])["outputs"]["num_tokens"] == [5]
    assert second.startswith(b"404")


def test_slow_and_half_sent_clients_hold_no_worker(running):
    before = threading.active_count()
    sockets = []
    for _ in range(100):
        s = socket.create_connection(running["rest"])
        s.sendall(b"POST /v1/models/transformer:predict HTTP/1.1\r\nHost: x\r\nContent-Le")
        sockets.append(s)
    try:
        status, answer = post(running["rest"], "/v1/models/transformer:predict",
                              {"signature_name": "score", "inputs": {"text": ["To be"]}})
        assert status == 200 and answer["outputs"]["num_tokens"] == [5]
        assert threading.active_count() - before < 5  # no thread per connection
        time.sleep(4.5)  # past the idle timeout (2 s, checked every 2 s): the server hangs up on them
        for s in sockets:
            s.settimeout(2)
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in sockets:
            s.close()


def test_grpc_refuses_impossible_shapes_without_allocating_them(running):
    grpc_stub = stub(running["grpc"])
    for dims in ([10 ** 7], [2 ** 40], [-1]):
        text = tf.make_tensor_proto(["x"])
        del text.tensor_shape.dim[:]
        for d in dims:
            text.tensor_shape.dim.add(size=d)
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub.Predict(predict_request("transformer", "score", text=text), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    wide = tf.make_tensor_proto([4294967297], dtype=tf.int64)
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Predict(predict_request("lstm", "serving_default", prompt=["x"], max_new_tokens=wide), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "int32" in e.value.details()
    from tensorflow_serving.apis import classification_pb2

    classify = classification_pb2.ClassificationRequest(model_spec=model_pb2.ModelSpec(name="transformer"))
    classify.input.example_list.examples.add()
    with pytest.raises(grpc.RpcError) as e:  # serving_default takes two inputs: not a classifier
        grpc_stub.Classify(classify, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Expected one input" in e.value.details()
    request = predict_request("transformer", "score", text=["To be"])
    request.output_filter.append("nope")
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Predict(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in e.value.details()


def test_a_bad_request_fails_alone_in_a_batch(running):
    good = {"inputs": {"prompt": ["To be"], "max_new_tokens": [4]}}
    bad = {"inputs": {"prompt": ["To be", "or not"], "max_new_tokens": [4]}}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: post(running["rest"], "/v1/models/transformer:predict",
                                               bad if i % 5 == 0 else good), range(40)))
    assert [s for i, (s, _) in enumerate(results) if i % 5 == 0] == [400] * 8
    answers = [a["outputs"]["completion"] for i, (s, a) in enumerate(results) if i % 5 and s == 200]
    assert len(answers) == 32 and len({json.dumps(a) for a in answers}) == 1


def test_a_request_over_max_batch_size_gets_tensorflow_servings_error(running):
    status, answer = post(running["rest"], "/v1/models/transformer:predict",
                          {"signature_name": "score", "inputs": {"text": ["To be"] * 9}})
    assert status == 400 and answer["error"] == "Task size 9 is larger than maximum input batch size 8"


def test_large_batch_splitting_answers_as_unbatched(served_bases):
    texts = ["To be", "or not", "to be", "that is", "the question", "Whether", "'tis nobler", "in the mind",
             "to suffer", "The slings"]
    core = server.ModelServer({"lm": server.ServedModel("lm", served_bases / "transformer")},
                              batching=batching.BatchingParameters(max_batch_size=16, enable_large_batch_splitting=True,
                                                                   max_execution_batch_size=4,
                                                                   allowed_batch_sizes=(2, 4)))
    core.refresh()
    plain = server.ModelServer({"lm": server.ServedModel("lm", served_bases / "transformer")})
    plain.refresh()
    try:
        _, split = core.predict("lm", None, "score", {"text": np.array(texts, object)})
        _, whole = plain.predict("lm", None, "score", {"text": np.array(texts, object)})
    finally:
        core.batcher.close()
    np.testing.assert_allclose(split["log_likelihood"], whole["log_likelihood"], rtol=1e-4)
    assert core.metrics.batch_size.count("lm") == 3  # 4 + 4 + 2 rows
    assert list(split["num_tokens"]) == list(whole["num_tokens"])


def test_padding_as_tensorflow_serving_pads_changes_no_answer(served_bases):
    """pad_variable_length_inputs: rows of different lengths share a batch, padded as TF Serving pads them."""
    parameters = batching.BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000,
                                             pad_variable_length_inputs=True, allowed_batch_sizes=(4, 8))
    padded = server.ModelServer({"lm": server.ServedModel("lm", served_bases / "transformer")}, batching=parameters)
    padded.refresh()
    rows = [[5, 6, 7], [8, 9], [5, 6, 7, 8, 9, 10], [11]]
    try:
        with ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(lambda r: padded.predict("lm", None, "next_token_logits", {
                "token_ids": np.array([r]), "num_tokens": np.array([len(r)])})[1]["logits"][0], rows))
        alone = [padded.predict("lm", None, "next_token_logits", {
            "token_ids": np.array([r]), "num_tokens": np.array([len(r)])})[1]["logits"][0] for r in rows]
    finally:
        padded.batcher.close()
    assert padded.metrics.batch_size.count("lm") < 8  # the four shared a batch at least once
    for got, want in zip(batched, alone):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grpc_deadline_and_cancellation_stop_the_work(running):
    """A long LSTM generation stops within a second of its deadline or of its client leaving."""
    grpc_stub = stub(running["grpc"])
    request = predict_request("lstm", "serving_default", prompt=["To be"],
                              max_new_tokens=tf.make_tensor_proto([100_000], dtype=tf.int32))
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.Predict(request, timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.0)  # the watchdog's cancellation lands
    busy = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - busy < 0.6, "the abandoned request kept a core busy"
    future = grpc_stub.Predict.future(request, timeout=60)
    time.sleep(0.5)
    future.cancel()
    time.sleep(1.0)
    busy = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - busy < 0.6, "the cancelled request kept a core busy"
    assert time.monotonic() - began < 15


def test_cancelling_one_request_leaves_its_concurrent_neighbour_running(served_bases):
    """Each request runs under its own cancellation, also when two start at once in two threads."""
    core = server.ModelServer({"lstm": server.ServedModel("lstm", served_bases / "lstm")}, limits=LIMITS)
    core.refresh()
    def inputs(new_tokens):
        return {"prompt": np.array([b"To be"], object), "max_new_tokens": np.array([new_tokens], np.int32)}

    for _ in range(3):
        doomed, kept = server.Call(), server.Call()
        threading.Timer(0.3, doomed.gone.set).start()
        with ThreadPoolExecutor(2) as pool:
            cancelled = pool.submit(core.predict, "lstm", None, "serving_default", inputs(50_000), None, doomed)
            finished = pool.submit(core.predict, "lstm", None, "serving_default", inputs(3000), None, kept)
            with pytest.raises(c.ServingError) as e:
                cancelled.result(timeout=60)
            assert e.value.code == "CANCELLED"
            assert finished.result(timeout=60)[1]["token_ids"].shape[0] == 1


def test_rest_timeout_stops_the_work_with_504(running):
    status, answer = post(running["rest"], GENERATE, {"inputs": {"prompt": ["To be"], "max_new_tokens": [100_000]}})
    assert status == 504 and "Deadline" in answer["error"]
    time.sleep(1.0)
    busy = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - busy < 0.6


def test_metrics_cannot_be_forged_or_grown(running):
    from prometheus_client.parser import text_string_to_metric_families

    for name in ("x" * 100_000 + str(i) for i in range(5)):
        post(running["rest"], f"/v1/models/{name}:predict", {"inputs": {"text": ["a"]}})
    post(running["rest"], "/v1/models/transformer:predict",
         {"signature_name": 'nope"}\nfake_series{a="1"} 1\n', "inputs": {"text": ["a"]}})
    stub_ = stub(running["grpc"])
    with pytest.raises(grpc.RpcError):
        stub_.Predict(predict_request('bad"\nname', "score", text=["a"]), timeout=10)
    status, page, _ = raw_http(running["rest"], b"GET /monitoring/prometheus/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and len(page) < 200_000
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    assert not any("fake" in name for name in families)
    models = {s.labels["model_name"] for s in families[":tensorflow:serving:request_count"].samples}
    assert models <= {"transformer", "lstm", "(unknown)"} and "(unknown)" in models
    apis = {s.labels["API"] for s in families[":tensorflow:serving:request_latency"].samples}
    assert apis <= {"predict", "classify", "Predict", "Classify"}


def test_grpc_health_service(running):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(running["grpc"]))
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="lstm"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_memory_is_reused_after_large_requests(running):
    """The largest request the limits allow, five times: resident memory does not keep growing."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    body = {"signature_name": "score", "inputs": {"text": ["To be, or not to be. " * 12] * 8}}
    assert post(running["rest"], "/v1/models/transformer:predict", body)[0] == 200
    after_first = rss()
    for _ in range(5):
        assert post(running["rest"], "/v1/models/transformer:predict", body)[0] == 200
    assert rss() - after_first < 64 << 20
