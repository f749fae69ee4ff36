"""`lmstack serve` as an operator runs it: model roots, TLS, version directories, a polled
config file, its flags, SIGTERM mid-request, the deploy files' command line, the JSON codec.
"""

import base64
import json
import shutil
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from pipelines.launch import free_ports
from serving import client as client_lib
from serving import contract as c
from serving import server
from tests.helpers import ROOT
from tests.serving_wire import post, predict_request, raw_http, stub


def local_options(base, **options) -> server.Options:
    """A server of one model, "lm", on free ports of 127.0.0.1, loading its versions once."""
    return server.Options(model_base_path=str(base), port=0, rest_api_port=0, bind_address="127.0.0.1",
                          file_system_poll_wait_seconds=0, **options)


def test_reload_cannot_load_from_outside_the_model_roots(served_bases, tmp_path):
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    outside = tmp_path / "elsewhere"
    shutil.copytree(served_bases / "transformer", outside)
    running = server.Server.build_and_start(local_options(served_bases / "transformer"))
    try:
        models = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}"))
        config = model_server_config_pb2.ModelServerConfig()
        config.model_config_list.config.add(name="other", base_path=str(outside))
        with pytest.raises(grpc.RpcError) as e:
            models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--model_config_roots" in e.value.details()
        assert list(running.core.models) == ["lm"]
    finally:
        running.stop(grace=0)


def test_a_bug_answers_internal_in_one_log_line_and_the_server_serves_on(served_bases, monkeypatch, caplog):
    running = server.Server.build_and_start(local_options(served_bases / "transformer"))
    try:
        score = running.core.predict
        monkeypatch.setattr(running.core, "predict", lambda *a, **k: 1 / 0)
        code, body = post(("127.0.0.1", running.rest_port), "/v1/models/lm:predict",
                          {"signature_name": "score", "inputs": {"text": ["To be"]}})
        assert code == 500 and body == {"error": "internal error: ZeroDivisionError"}
        with pytest.raises(grpc.RpcError) as e:
            stub(f"127.0.0.1:{running.grpc_port}").Predict(predict_request("lm", "score", text=["To be"]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INTERNAL and e.value.details() == "internal error: ZeroDivisionError"
        failures = [r.getMessage() for r in caplog.records if "failed: ZeroDivisionError" in r.getMessage()]
        assert len(failures) == 2 and all("\n" not in f for f in failures), failures
        monkeypatch.setattr(running.core, "predict", score)
        code, body = post(("127.0.0.1", running.rest_port), "/v1/models/lm:predict",
                          {"signature_name": "score", "inputs": {"text": ["To be"]}})
        assert code == 200, body
    finally:
        running.stop(grace=0)


def test_tls_clients_connect_and_plain_ones_cannot(served_bases, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    ssl_file = tmp_path / "ssl.config"
    ssl_file.write_text(f"server_key: {json.dumps(key_pem)}\nserver_cert: {json.dumps(cert_pem)}\n")
    running = server.Server.build_and_start(local_options(served_bases / "transformer", ssl_config_file=str(ssl_file)))
    port = running.grpc_port
    try:
        request = predict_request("lm", "score", text=["To be"])
        secure = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(cert_pem.encode()))
        reply = prediction_service_pb2_grpc.PredictionServiceStub(secure).Predict(request, timeout=30)
        assert list(reply.outputs["num_tokens"].int_val) == [5]
        with pytest.raises(grpc.RpcError) as e:
            stub(f"localhost:{port}").Predict(request, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)
    (tmp_path / "half.config").write_text('server_key: "k"')
    with pytest.raises(c.ServingError, match="needs server_key and server_cert"):
        server.read_ssl_config(tmp_path / "half.config")


def test_version_directories_and_load_retries(served_bases, tmp_path):
    base = tmp_path / "lm"
    shutil.copytree(served_bases / "transformer" / "1", base / "1")
    shutil.copytree(served_bases / "transformer" / "1", base / "²")  # str.isdigit() says yes; not a version
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"half a copy")  # copied in place, not renamed
    model = server.ServedModel("lm", base, max_num_load_retries=3, load_retry_interval=0.2)
    assert model.on_disk() == [1, 3]
    model.refresh()
    assert sorted(model.versions) == [1] and 3 in model.failed  # the good one serves meanwhile
    shutil.rmtree(base / "3")
    shutil.copytree(served_bases / "transformer" / "1", base / "3")  # the copy completes
    time.sleep(0.3)
    model.refresh()
    assert sorted(model.versions) == [3] and not model.failed


def test_the_model_config_file_is_reread(served_bases, tmp_path):
    """--model_config_file_poll_wait_seconds: a model added to the file is served; a broken file changes nothing."""
    config = tmp_path / "models.config"

    def write(*names):
        config.write_text("model_config_list {" + "".join(
            f' config {{ name: "{n}" base_path: "{served_bases / n}" }}' for n in names) + " }")

    write("transformer")
    core = server.ModelServer(server.models_from_config_file(config))
    core.refresh()
    core.start_polling(0, str(config), 0.2, server.models_from_config_file)
    try:
        write("transformer", "lstm")
        deadline = time.monotonic() + 60
        while "lstm" not in core.models and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(core.models) == ["lstm", "transformer"] and core.models["lstm"].versions
        config.write_text("model_config_list { config { name: ")
        time.sleep(1.0)
        assert sorted(core.models) == ["lstm", "transformer"]
    finally:
        core.stop_polling()


def test_version_and_flags_without_effect(capsys):
    from app.main import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--version"])
    assert e.value.code == 0 and "TensorFlow ModelServer" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--num_load_threads=4", "--rest_api_enable_cors_support"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "give either --model_base_path" in err  # no model: refused in one line
    assert "--num_load_threads has no effect here" in err and "--rest_api_enable_cors_support has no effect" in err


def run_serve(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "app", "serve", *args], stderr=subprocess.PIPE, text=True,
                            **kwargs)


@pytest.mark.slow
def test_sigterm_with_a_request_in_flight_drains_and_exits_0(served_bases):
    grpc_port, rest_port = free_ports(2)
    process = run_serve([f"--model_base_path={served_bases / 'lstm'}", "--model_name=lstm", f"--port={grpc_port}",
                         f"--rest_api_port={rest_port}", "--bind_address=127.0.0.1"])
    try:
        client = client_lib.connect(f"127.0.0.1:{grpc_port}", "grpc", model_name="lstm", retries=10, backoff=0.5)
        client.status()
        request = predict_request("lstm", "serving_default", prompt=["To be"],
                                  max_new_tokens=tf.make_tensor_proto([1500], dtype=tf.int32))
        future = stub(f"127.0.0.1:{grpc_port}").Predict.future(request, timeout=60)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert len(future.result().outputs["token_ids"].tensor_shape.dim) == 2  # answered, not cut
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def _deploy_args(path, key):
    """The `command:`/`args:` list of a deploy file, as written there."""
    import yaml

    docs = list(yaml.safe_load_all(path.read_text()))
    if key == "command":
        return docs[0]["services"]["serving"]["command"]
    return docs[0]["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.slow
@pytest.mark.parametrize("deploy_file, key", [("docker-compose.yml", "command"), ("kubernetes.yaml", "args")])
def test_lmstack_serve_runs_the_deploy_files_command_line(served_bases, tmp_path, deploy_file, key):
    """The exact flags of deploy/serving/, with the container's paths mapped onto this machine."""
    deploy = ROOT / "deploy" / "serving"
    served = json.dumps(str(served_bases / "transformer"))
    config = (deploy / "models.config").read_text().replace('"/models/lm"', served)
    (tmp_path / "models.config").write_text(config)
    for name in ("batching_parameters.txt", "monitoring.config"):
        shutil.copy(deploy / name, tmp_path / name)
    grpc_port, rest_port = free_ports(2)
    args = [a.replace("/config/", f"{tmp_path}/").replace("=8500", f"={grpc_port}").replace("=8501", f"={rest_port}")
            for a in _deploy_args(deploy / deploy_file, key)]
    process = run_serve([*args, "--bind_address=127.0.0.1"])
    try:
        client = client_lib.connect(f"127.0.0.1:{rest_port}", "rest", retries=10, backoff=0.5)
        assert client.status()[0]["state"] == "AVAILABLE"
        assert client.next_token_logits([[5, 6, 7], [8]])  # rows of two lengths: padded, as the file asks
        status, page, _ = raw_http(("127.0.0.1", rest_port),
                                   b"GET /monitoring/prometheus/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and b":tensorflow:serving:request_count" in page
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
        assert "warning" not in log and "Traceback" not in log, log
    finally:
        if process.poll() is None:
            process.kill()


def test_json_codec_follows_tensorflow_serving():
    """Outputs named *_bytes come back as {"b64": ...}; b64 inputs become bytes; shapes and kinds are kept."""
    from serving.server import json_codec

    raw = np.array([b"\xff\x00", b"ok"], dtype=object)
    assert json_codec.json_value("audio_bytes", raw) == [{"b64": base64.b64encode(b"\xff\x00").decode()},
                                                         {"b64": "b2s="}]
    assert json_codec.json_value("completion", raw)[1] == "ok"
    array = json_codec.to_array("x", [[{"b64": "AAE="}], ["text"]], 100)
    assert array.shape == (2, 1) and array[0, 0] == b"\x00\x01" and array[1, 0] == b"text"
    assert json_codec.to_array("x", [[1, 2], [3, 4]], 100).dtype == np.int64
    assert json_codec.to_array("x", [1, 2.5], 100).dtype == np.float64
    body = json_codec.response_body({"a": np.array([1, 2]), "b": np.array([[1.5], [2.5]])}, True, 2)
    assert body == {"predictions": [{"a": 1, "b": [1.5]}, {"a": 2, "b": [2.5]}]}
