"""`lmstack serve`: versions, labels, the model config file, bad requests, shutdown — with TF Serving's clients."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from serving import client as client_lib
from serving import contract as c
from serving import export, server
from tests.test_export import free_port, trained_workdir


@pytest.fixture(scope="module")
def versions(tmp_path_factory, english_text):
    """A base path with versions 1 and 2 of a tiny transformer (the same export, copied)."""
    root = tmp_path_factory.mktemp("serve")
    workdir = trained_workdir(root, english_text, "transformer")
    base = root / "models" / "lm"
    export.export(workdir, export.ExportConfig(export_base=str(base), version=1))
    shutil.copytree(base / "1", base / "2")
    return base


@pytest.fixture(scope="module")
def running(versions):
    """A server on `versions` (newest version), for tests that do not change what it serves."""
    core = server.ModelServer({"lm": server.ServedModel("lm", versions)})
    core.refresh()
    grpc_server, rest_server, grpc_target, rest_target = start(core)
    yield {"grpc": grpc_target, "rest": rest_target}
    rest_server.shutdown()
    grpc_server.stop(None)


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
        # ...and a good version 2 (copied in under a hidden name, then renamed, as `lmstack export` does) does.
        shutil.copytree(versions / "2", base / ".incoming")
        os.rename(base / ".incoming", base / "2")
        deadline = time.time() + 60
        while time.time() < deadline and [s["version"] for s in client.status() if s["state"] == "AVAILABLE"] != [2]:
            time.sleep(0.2)
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
  config {{
    name: "newest"
    base_path: "{versions}"
  }}
}}
""")
    models = server.models_from_config_file(config)
    core = server.ModelServer(models)
    core.refresh()
    grpc_server, rest_server, grpc_target, rest_target = start(core)
    try:
        assert sorted(s["version"] for s in client_lib.connect(grpc_target, "grpc").status()) == [1, 2]
        assert [s["version"] for s in client_lib.connect(grpc_target, "grpc", model_name="newest").status()] == [2]
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
    with pytest.raises(c.ServingError, match="cannot read the model config file"):
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


def test_row_and_columnar_formats_agree(running):
    url = f"http://{running['rest']}/v1/models/lm:predict"
    _, rows = post(url, json.dumps({"signature_name": "score", "instances": [{"text": "To be"},
                                                                             {"text": "or not"}]}).encode())
    _, columns = post(url, json.dumps({"signature_name": "score", "inputs": {"text": ["To be", "or not"]}}).encode())
    assert [r["log_likelihood"] for r in rows["predictions"]] == columns["outputs"]["log_likelihood"]
    assert [r["num_tokens"] for r in rows["predictions"]] == columns["outputs"]["num_tokens"] == [5, 6]


@pytest.mark.slow
def test_lmstack_serve_answers_then_stops_on_sigterm(versions):
    grpc_port, rest_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", f"--model_base_path={versions}", "--model_name=lm",
         f"--port={grpc_port}", f"--rest_api_port={rest_port}"],
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


def test_serve_bad_flags(tmp_path, capsys):
    from app.main import main

    with pytest.raises(SystemExit) as e:
        main(["serve", f"--model_base_path={tmp_path}"])
    assert e.value.code == 2
    assert "no loadable version" in capsys.readouterr().err
