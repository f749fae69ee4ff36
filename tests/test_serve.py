"""`lmstack serve`: versions, labels, the model config file, bad requests, shutdown — with TF Serving's clients."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from pipelines.launch import free_ports
from serving import client as client_lib
from serving import contract as c
from serving import server
from tests.helpers import tiny_export


@pytest.fixture(scope="module")
def versions(tmp_path_factory, english_text):
    """A base path with versions 1 and 2 of a tiny transformer (the same export, copied)."""
    _, exported = tiny_export("transformer", tmp_path_factory, english_text)
    base = tmp_path_factory.mktemp("serve") / "models" / "lm"
    shutil.copytree(exported, base / "1")
    shutil.copytree(exported, base / "2")
    return base


@pytest.fixture(scope="module")
def running(versions):
    """A server on `versions` (newest version), for tests that do not change what it serves."""
    running = server.Server.build_and_start(server.Options(model_base_path=str(versions), port=0, rest_api_port=0,
                                                           file_system_poll_wait_seconds=0))
    yield {"grpc": f"localhost:{running.grpc_port}", "rest": f"localhost:{running.rest_port}"}
    running.stop(grace=0)


def start(core):
    grpc_server, grpc_port = server.start_grpc(core, 0)
    rest_server, rest_port = server.start_rest(core, 0)
    return grpc_server, rest_server, f"localhost:{grpc_port}", f"localhost:{rest_port}"


def post(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_new_versions_load_while_serving_and_old_ones_unload(versions, tmp_path):
    base = tmp_path / "lm"
    shutil.copytree(versions / "1", base / "1")
    core = server.ModelServer({"lm": server.ServedModel("lm", base)})
    core.refresh()
    grpc_server, rest_server, grpc_target, rest_target = start(core)
    core.start_polling(0.2)
    try:
        client = client_lib.connect(grpc_target, "grpc")
        before = client.generate(["ROMEO."], 8)
        assert [s["version"] for s in client.status()] == [1]
        # A broken version 3 is reported and does not replace the good one...
        (base / "3").mkdir()
        (base / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
        # ...and a good version 2 (copied in under a hidden name, then renamed, as `lmstack export` does) does,
        # while clients keep sending requests: none of them may fail.
        failures, answered, stop = [], [0], threading.Event()

        def hammer(protocol, target):
            c = client_lib.connect(target, protocol, retries=0)
            while not stop.is_set():
                try:
                    assert c.generate(["ROMEO."], 8) == before
                    answered[0] += 1
                except Exception as e:  # collected and asserted below
                    failures.append(repr(e))

        threads = [threading.Thread(target=hammer, args=args) for args in
                   [("grpc", grpc_target), ("rest", rest_target)] * 2]
        for t in threads:
            t.start()
        shutil.copytree(versions / "2", base / ".incoming")
        os.rename(base / ".incoming", base / "2")
        deadline = time.time() + 60
        while time.time() < deadline and [s["version"] for s in client.status() if s["state"] == "AVAILABLE"] != [2]:
            time.sleep(0.2)
        time.sleep(1.0)  # requests keep flowing on version 2
        stop.set()
        for t in threads:
            t.join()
        assert failures == [] and answered[0] > 10
        statuses = {s["version"]: s for s in client.status()}
        assert statuses[2]["state"] == "AVAILABLE" and 1 not in statuses
        assert statuses[3]["state"] == "END" and statuses[3]["error_message"]
        assert client.generate(["ROMEO."], 8) == before  # the same weights, now from version 2
        rest = client_lib.connect(rest_target, "rest")
        assert {s["version"]: s["state"] for s in rest.status()} == {3: "END", 2: "AVAILABLE"}
    finally:
        core.stop_polling()
        rest_server.shutdown()
        grpc_server.stop(None)


def test_model_config_file_policies_and_labels(versions, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(f"""
model_config_list {{
  config {{
    name: "lm"
    base_path: "{versions}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
}}
""")
    models = server.models_from_config_file(config)
    core = server.ModelServer(models)
    core.refresh()
    grpc_server, rest_server, grpc_target, rest_target = start(core)
    try:
        assert sorted(s["version"] for s in client_lib.connect(grpc_target, "grpc").status()) == [1, 2]
        assert client_lib.connect(rest_target, "rest", version=1).generate(["To be"], 5)
        for label, version in (("stable", 1), ("canary", 2)):
            status, body = post(f"http://{rest_target}/v1/models/lm/labels/{label}:predict",
                                json.dumps({"inputs": {"prompt": ["To be"], "max_new_tokens": [5]}}).encode())
            assert status == 200 and body["outputs"]["completion"]
            with urllib.request.urlopen(f"http://{rest_target}/v1/models/lm/labels/{label}/metadata") as r:
                assert json.loads(r.read())["model_spec"]["version"] == str(version)
        status, body = post(f"http://{rest_target}/v1/models/lm/labels/nope:predict",
                            json.dumps({"inputs": {"prompt": ["x"], "max_new_tokens": [1]}}).encode())
        assert status == 400 and "label" in body["error"]
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc
        import grpc
        import tensorflow as tf

        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(grpc_target))
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="lm", version_label="canary"))
        request.inputs["prompt"].CopyFrom(tf.make_tensor_proto(["To be"]))
        request.inputs["max_new_tokens"].CopyFrom(tf.make_tensor_proto([5], dtype=tf.int32))
        assert stub.Predict(request, timeout=30).model_spec.version.value == 2
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)
    bad = tmp_path / "bad.config"
    bad.write_text("model_config_list { config { name: 'lm' base_path: ")
    with pytest.raises(c.ServingError, match="bad.config is not a valid ModelServerConfig: 1:52"):
        server.models_from_config_file(bad)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "JSON"),
    (b'{"instances": []}', 400, "non-empty"),
    (b'{"inputs": {"prompt": ["x"]}}', 400, "missing ['max_new_tokens']"),
    (b'{"inputs": {"prompt": ["x"], "max_new_tokens": ["many"]}}', 400, "max_new_tokens"),
    (b'{"inputs": {"prompt": [["x"]], "max_new_tokens": [1]}}', 400, "shape"),
    (b'{"signature_name": "nope", "inputs": {"prompt": ["x"], "max_new_tokens": [1]}}', 400, "nope"),
])
def test_bad_requests_get_tensorflow_serving_errors_and_the_server_keeps_serving(running, body, status, message):
    rest_target = running["rest"]
    got_status, got = post(f"http://{rest_target}/v1/models/lm:predict", body)
    assert got_status == status and message in got["error"]
    got_status, got = post(f"http://{rest_target}/v1/models/lm/versions/9:predict",
                           b'{"inputs": {"prompt": ["x"], "max_new_tokens": [1]}}')
    assert got_status == 404
    assert client_lib.connect(rest_target, "rest").generate(["To be"], 3)  # still serving


def test_oversized_bodies_are_refused(running):
    import http.client

    host, port = running["rest"].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/models/lm:predict")
    connection.putheader("Content-Length", str(server.Limits().max_request_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]  # refused unread
    assert client_lib.connect(running["rest"], "rest").generate(["To be"], 3)  # still serving


def test_row_and_columnar_formats_agree(running):
    url = f"http://{running['rest']}/v1/models/lm:predict"
    _, rows = post(url, json.dumps({"signature_name": "score", "instances": [{"text": "To be"},
                                                                             {"text": "or not"}]}).encode())
    _, columns = post(url, json.dumps({"signature_name": "score", "inputs": {"text": ["To be", "or not"]}}).encode())
    assert [r["log_likelihood"] for r in rows["predictions"]] == columns["outputs"]["log_likelihood"]
    assert [r["num_tokens"] for r in rows["predictions"]] == columns["outputs"]["num_tokens"] == [5, 6]


@pytest.mark.slow
def test_grpc_outputs_fill_the_typed_fields_like_tensorflow_serving(running):
    """Clients that read `response.outputs[k].float_val` directly (as many TF Serving clients do) get values."""
    import grpc
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(running["grpc"]))
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="lm", signature_name="score"))
    request.inputs["text"].dtype = types_pb2.DT_STRING  # built by hand, as a client without TensorFlow would
    request.inputs["text"].tensor_shape.dim.add(size=2)
    request.inputs["text"].string_val.extend([b"To be", b"or not"])
    outputs = stub.Predict(request, timeout=30).outputs
    assert list(outputs["num_tokens"].int_val) == [5, 6] and not outputs["num_tokens"].tensor_content
    assert len(outputs["log_likelihood"].float_val) == 2 and all(v < 0 for v in outputs["log_likelihood"].float_val)
    rest = client_lib.connect(running["rest"], "rest").score(["To be", "or not"])
    assert [n for _, n in rest] == [5, 6]
    assert np.allclose([ll for ll, _ in rest], outputs["log_likelihood"].float_val, rtol=1e-5)


def test_lmstack_serve_answers_then_stops_on_sigterm(versions):
    grpc_port, rest_port = free_ports(2)
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", f"--model_base_path={versions}", "--model_name=lm",
         f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--tensorflow_intra_op_parallelism=1",
         "--tensorflow_inter_op_parallelism=2"],
        stderr=subprocess.PIPE, text=True)
    try:
        client = client_lib.connect(f"localhost:{grpc_port}", "grpc", retries=8, backoff=0.5)
        assert client.status()[0]["version"] == 2
        assert client_lib.connect(f"localhost:{rest_port}", "rest").generate(["To be"], 4)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
        assert "lm version 2 loaded" in log and "stopping" in log
    finally:
        if process.poll() is None:
            process.kill()


def test_compiled_signatures_under_tensorflow_servings_xla_flag(versions, tmp_path):
    """`lmstack serve --xla_cpu_compilation_enabled` (TF Serving's command line) compiles every bucket at load
    and no request compiles again; without the flag the compiled signatures fail, naming it."""
    grpc_port, rest_port = free_ports(2)
    dumps = tmp_path / "xla"  # XLA writes each module it compiles here: a count of compilations
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", f"--model_base_path={versions}", f"--port={grpc_port}",
         f"--rest_api_port={rest_port}", "--xla_cpu_compilation_enabled", "--file_system_poll_wait_seconds=0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": f"--xla_dump_to={dumps}"})

    def compilations():
        return len(list(dumps.glob("*before_optimizations.txt")))
    try:
        client = client_lib.connect(f"localhost:{rest_port}", "rest", retries=10, backoff=1.0)
        assert client.status()[0]["version"] == 2
        at_load = compilations()
        assert at_load >= 2  # the tiny export's buckets: batch 1 and 4 at length 16
        prompts = ["ROMEO.", "To be, or not", "", "What light"]
        for batch in ([prompts[0]], prompts[:3], prompts, [prompts[1]]):  # batches of 1, 3 (-> 4), 4, 1
            assert client.generate(batch, 7, compiled=True) == client.generate(batch, 7)
            assert (client.generate(batch, 5, temperature=1.3, seed=3, compiled=True)
                    == client.generate(batch, 5, temperature=1.3, seed=3))
        # Streams run generate_chunk_xla on the same buckets.
        for prompt in ("ROMEO.", ""):
            assert "".join(client.stream(prompt, 9)) == client.generate([prompt], 9)[0]
        assert compilations() == at_load
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_max_new_tokens_past_the_context_fails_alone(running, protocol):
    client = client_lib.connect(running[protocol], protocol)
    with pytest.raises(c.ServingError) as e:
        client.generate(["ROMEO.", "a"], 16)  # the tiny transformer's context is 16
    assert e.value.code == "INVALID_ARGUMENT" and "ask for at most 15" in e.value.message
    assert client.generate(["ROMEO."], 15)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_compiled_signatures_fail_without_the_xla_flag(running, protocol):
    client = client_lib.connect(running[protocol], protocol)
    with pytest.raises(c.ServingError) as e:
        client.generate(["ROMEO."], 4, compiled=True)
    assert e.value.code == {"grpc": "FAILED_PRECONDITION", "rest": "INVALID_ARGUMENT"}[protocol]  # REST: HTTP 400
    assert "XLA compilation disabled" in e.value.message and "--xla_cpu_compilation_enabled" in e.value.message
    assert client.generate(["ROMEO."], 4)  # the uncompiled signature still answers


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_streams_make_the_text_of_one_generate_call(running, protocol):
    client = client_lib.connect(running[protocol], protocol)
    for prompt, settings in [("ROMEO.", {}), ("", {}), ("To be", dict(temperature=1.4, top_k=20, seed=9))]:
        pieces = list(client.stream(prompt, 14, **settings))  # past the tiny context of 16 with the prompt
        assert len(pieces) > 1  # the text came in parts, as it was made
        assert "".join(pieces) == client.generate([prompt], 14, **settings)[0]


def test_a_stream_stops_when_its_client_goes(tmp_path_factory, english_text):
    """Closing a stream (REST: the connection; gRPC: cancelling the call) stops its generation on the server."""
    import http.client

    _, exported = tiny_export("lstm", tmp_path_factory, english_text)  # no context: a stream can run long
    core = server.ModelServer({"lm": server.ServedModel("lm", exported.parent)})
    core.refresh()
    chunks = []  # every chunk a stream runs
    run = core._run
    core._run = lambda *args: chunks.append(1) or run(*args)
    grpc_server, rest_server, grpc_target, rest_target = start(core)
    try:
        # 2,000 tokens: about 125 chunks of 16.
        body = json.dumps({"inputs": {"prompt": "ROMEO.", "max_new_tokens": 2000}}).encode()
        host, port = rest_target.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", "/v1/models/lm:stream", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        assert response.readline().startswith(b"data: ")
        response.close()
        connection.close()
        assert core.drain(timeout=30)  # nothing left running
        assert len(chunks) < 30, len(chunks)  # the stream stopped soon after its client left
        stream = client_lib.connect(grpc_target, "grpc").stream("ROMEO.", 2000)
        assert next(stream) is not None
        stream.close()
        assert core.drain(timeout=30)
        assert len(chunks) < 60, len(chunks)
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)


@pytest.mark.parametrize("inputs, status, message", [
    ({"prompt": "a", "max_new_tokens": 16}, 400, "context of 16 tokens: ask for at most 15"),
    ({"max_new_tokens": 5}, 400, "missing 'prompt'"),
    ({"prompt": ["a", "b"]}, 400, "one 'prompt'"),
    ({"prompt": "a", "max_new_tokens": 10**6}, 400, "--max_new_tokens_limit"),
    ({"prompt": "a", "nope": 1}, 400, "unexpected ['nope']"),
])
def test_bad_streams_fail_before_they_start(running, inputs, status, message):
    code, answer = post(f"http://{running['rest']}/v1/models/lm:stream", json.dumps({"inputs": inputs}).encode())
    assert code == status and message in answer["error"]
    code, answer = post(f"http://{running['rest']}/v1/models/nope:stream", json.dumps({"inputs": inputs}).encode())
    assert code == 404


@pytest.mark.parametrize("flags, message", [
    (["--model_base_path={tmp}"], "no loadable version"),
    ([], "give either --model_base_path"),
    (["--model_base_path={tmp}", "--batching_parameters_file={tmp}/b.txt"], "needs --enable_batching"),
    (["--model_base_path={tmp}", "--enable_batching", "--batching_parameters_file={tmp}/b.txt"],
     'has no field named "max_batch"'),
    (["--model_config_file={tmp}/missing.config"], "cannot read the model config file"),
    (["--model_base_path=nope://bucket/lm"], "no filesystem here handles nope://"),
    (["--model_base_path={tmp}", "--tensorflow_intra_op_parallelism=-1"], "take 0 (TensorFlow's choice)"),
    (["--model_base_path={tmp}", "--generation_steps_per_call=0"], "--generation_steps_per_call=0: takes 1 to 64"),
    (["--model_base_path={tmp}", "--generation_slots=-2"], "--generation_slots and --generation_max_waiting"),
    (["--model_base_path={tmp}", "--openai_api_keys_file={tmp}/b.txt"],
     "--openai_api_keys_file needs --openai_api_port"),
    (["--model_base_path={tmp}", "--openai_api_port=8000", "--openai_api_keys_file={tmp}/keys"], "no such file"),
    (["--model_base_path={tmp}", "--openai_api_port=70000"], "--openai_api_port=70000: a port is"),
])
def test_serve_bad_flags(tmp_path, capsys, flags, message):
    from app.main import main

    (tmp_path / "b.txt").write_text("max_batch { value: 8 }")
    with pytest.raises(SystemExit) as e:
        main(["serve", *(f.format(tmp=tmp_path) for f in flags)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_batched_answers_equal_unbatched_ones_and_batches_form(versions):
    from concurrent.futures import ThreadPoolExecutor

    from serving.server import batching

    prompts = ["ROMEO.", "To be, or not", "", "What light through yonder window", "A", "Enter HAMLET"] * 3
    token_rows = [[5, 6, 7], [8, 9], [5, 6, 7], [10]] * 3  # next_token_logits of different lengths

    def answers(parameters):
        core = server.ModelServer({"lm": server.ServedModel("lm", versions, xla=True)}, batching=parameters, xla=True)
        core.refresh()
        grpc_server, rest_server, grpc_target, rest_target = start(core)
        try:
            grpc_client = client_lib.connect(grpc_target, "grpc")
            rest_client = client_lib.connect(rest_target, "rest")

            def one(i):
                p = prompts[i % len(prompts)]
                cl = grpc_client if i % 2 else rest_client
                return (cl.generate([p], 6), cl.generate([p], 6, temperature=1.2, seed=i),
                        cl.score([p]), cl.next_token_logits([token_rows[i % len(token_rows)]]),
                        cl.generate([p], 6, compiled=True))
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, range(32)))
            return results, core.metrics
        finally:
            rest_server.shutdown()
            grpc_server.stop(None)
            if core.batcher:
                core.batcher.close()

    unbatched, _ = answers(None)
    batched, metrics = answers(batching.BatchingParameters(max_batch_size=8, batch_timeout_micros=50_000))
    for (text, sampled, score, logits, compiled), (b_text, b_sampled, b_score, b_logits, b_compiled) in zip(
            unbatched, batched):
        assert (text, sampled) == (b_text, b_sampled) == (compiled, sampled) == (b_compiled, b_sampled)
        assert score[0][1] == b_score[0][1] and score[0][0] == pytest.approx(b_score[0][0], rel=1e-4)
        np.testing.assert_allclose(logits, b_logits, rtol=1e-4, atol=1e-4)
    batches = metrics.batch_size.count("lm")
    assert 0 < batches < 5 * 32  # requests were merged: fewer batches than requests
    assert metrics.request_count.value("lm", "OK") == 5 * 32


def test_prometheus_metrics_under_tensorflow_serving_names(versions, tmp_path):
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config {\n  enable: true\n  path: "/monitoring/prometheus/metrics"\n}\n')
    core = server.ModelServer({"lm": server.ServedModel("lm", versions)},
                              metrics_path=server.read_monitoring_config(monitoring))
    core.refresh()
    grpc_server, rest_server, _, rest_target = start(core)
    try:
        client = client_lib.connect(rest_target, "rest")
        client.generate(["To be"], 3)
        with pytest.raises(client_lib.ServingError):
            client.predict("nope", {"prompt": ["x"]})
        with urllib.request.urlopen(f"http://{rest_target}/monitoring/prometheus/metrics") as r:
            text = r.read().decode()
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)
    assert ':tensorflow:serving:request_count{model_name="lm",status="OK"} 1' in text
    assert ':tensorflow:serving:request_count{model_name="lm",status="FAILED_PRECONDITION"} 1' in text
    # TF Serving times the requests that succeed
    assert ':tensorflow:serving:request_latency_count{model_name="lm",API="predict",entrypoint="REST"} 1' in text
    assert 'lmstack:model:loaded_versions{model_name="lm"} 1' in text
    (tmp_path / "off.config").write_text("prometheus_config { enable: false }")
    assert server.read_monitoring_config(tmp_path / "off.config") is None
    (tmp_path / "typo.config").write_text("prometheus_config { enabled: true }")
    with pytest.raises(c.ServingError, match='typo.config is not a valid MonitoringConfig: .*no field named "enabled"'):
        server.read_monitoring_config(tmp_path / "typo.config")


def test_batching_parameters_file(tmp_path):
    from serving.server import batching

    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 1000 }\n"
                    "num_batch_threads { value: 2 }  # a comment\npad_variable_length_inputs: true\n"
                    "allowed_batch_sizes: [8, 16]\nallowed_batch_sizes: 32\n")
    assert server.read_batching_parameters(path) == batching.BatchingParameters(
        max_batch_size=32, batch_timeout_micros=1000, num_batch_threads=2, pad_variable_length_inputs=True,
        allowed_batch_sizes=(8, 16, 32))
    path.write_text("max_batch_size { value: 16 }\nenable_large_batch_splitting { value: true }\n"
                    "max_execution_batch_size { value: 8 }\nallowed_batch_sizes: [4, 8]")
    assert server.read_batching_parameters(path).execution_batch_size == 8
    for text, message in [("max_batch_size { value: 0 }", "max_batch_size must be at least 1"),
                          ("max_batch_sise { value: 8 }", 'no field named "max_batch_sise"'),
                          ("max_batch_size { value: 16 } allowed_batch_sizes: [4, 8]",
                           r"last entry of allowed_batch_sizes \(8\) must equal max_batch_size \(16\)")]:
        path.write_text(text)
        with pytest.raises(c.ServingError, match=message):
            server.read_batching_parameters(path)


def test_reload_config_request_adds_and_drops_models(versions):
    import grpc
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    core = server.ModelServer({"lm": server.ServedModel("lm", versions)})
    core.refresh()
    grpc_server, rest_server, grpc_target, _ = start(core)
    try:
        stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(grpc_target))
        config = model_server_config_pb2.ModelServerConfig()
        config.model_config_list.config.add(name="second", base_path=str(versions), model_platform="tensorflow")
        stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
        assert client_lib.connect(grpc_target, "grpc", model_name="second").generate(["To be"], 3)
        with pytest.raises(client_lib.ServingError) as e:
            client_lib.connect(grpc_target, "grpc", model_name="lm").status()
        assert e.value.code == "NOT_FOUND"
        config.model_config_list.config.add(name="broken", base_path=str(versions / "missing"))
        with pytest.raises(grpc.RpcError) as e:
            stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert client_lib.connect(grpc_target, "grpc", model_name="second").status()  # the old config stands
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)
