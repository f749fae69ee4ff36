"""Request logs as TensorFlow Serving defines them (a model's `logging_config`), read back with
tensorflow-serving-api's own `PredictionLog` proto: what was sent and answered, sampling, rotation,
the size bound, and storage that fails without failing a request."""

import json
import random

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from pipelines.launch import free_ports
from serving import client as client_lib
from serving import contract as c
from serving import server
from serving.contract import ServingError
from serving.server import metrics, request_log
from tests.serving_wire import post, predict_request, stub


def config_file(tmp_path, base, logging: str) -> str:
    path = tmp_path / "models.config"
    path.write_text(f'model_config_list {{ config {{ name: "lm" base_path: "{base}" '
                    f'logging_config {{ {logging} }} }} }}')
    return str(path)


def start(tmp_path, served_bases, logging: str, **options) -> server.Server:
    return server.Server.build_and_start(server.Options(
        model_config_file=config_file(tmp_path, served_bases / "transformer", logging), port=0, rest_api_port=0,
        bind_address="127.0.0.1", file_system_poll_wait_seconds=0, **options))


def tfrecord(prefix: str, rate: float = 1.0) -> str:
    return (f'log_collector_config {{ type: "tfrecord" filename_prefix: "{prefix}" }} '
            f'sampling_config {{ sampling_rate: {rate} }}')


def read_logs(prefix) -> list:
    files = sorted(tf.io.gfile.glob(f"{prefix}-*.tfrecord"))
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]


def tensor(proto) -> np.ndarray:
    return tf.make_ndarray(proto)


def test_every_route_is_logged_with_what_was_sent_and_answered(served_bases, tmp_path):
    prefix = str(tmp_path / "logs" / "lm")
    running = start(tmp_path, served_bases, tfrecord(prefix), openai_api_port=free_ports(1)[0])
    sent = []
    try:
        rest = ("127.0.0.1", running.rest_port)
        body = {"inputs": {"prompt": ["ROMEO.", "JULIET."], "max_new_tokens": [3, 3]}}
        status, rest_answer = post(rest, "/v1/models/lm:predict", body)
        assert status == 200
        sent.append(("rest", [b"ROMEO.", b"JULIET."], [t.encode() for t in rest_answer["outputs"][c.COMPLETION]]))
        grpc_answer = stub(f"127.0.0.1:{running.grpc_port}").Predict(predict_request(
            "lm", c.GENERATE, prompt=np.array([b"HAMLET."], object), max_new_tokens=np.array([4], np.int32),
            temperature=np.array([0.0], np.float32), top_k=np.array([0], np.int32),
            top_p=np.array([1.0], np.float32), seed=np.array([0], np.int32)), timeout=60)
        sent.append(("grpc", [b"HAMLET."], list(tensor(grpc_answer.outputs[c.COMPLETION]))))
        for protocol, port in (("rest", running.rest_port), ("grpc", running.grpc_port)):
            pieces = client_lib.connect(f"127.0.0.1:{port}", protocol).stream("KING.", max_new_tokens=5)
            sent.append((protocol + " stream", [b"KING."], ["".join(pieces).encode()]))
        status, openai_answer = post(("127.0.0.1", running.openai_port), "/v1/completions",
                                     {"model": "lm", "prompt": "OTHELLO.", "max_tokens": 3})
        assert status == 200
        sent.append(("openai", [b"OTHELLO."], [openai_answer["choices"][0]["text"].encode()]))
    finally:
        running.stop()
    logs = read_logs(prefix)
    assert len(logs) == len(sent)
    by_prompt = {tuple(tensor(log.predict_log.request.inputs[c.PROMPT])): log for log in logs}
    for route, prompts, completions in sent:
        log = by_prompt[tuple(prompts)]
        assert log.log_metadata.model_spec.name == "lm", route
        assert log.log_metadata.model_spec.version.value == 1
        assert log.log_metadata.sampling_config.sampling_rate == 1.0
        assert log.log_metadata.timestamp_secs > 0
        assert list(tensor(log.predict_log.response.outputs[c.COMPLETION])) == completions, route
        if route == "rest":
            assert log.log_metadata.model_spec.signature_name == c.SERVING_DEFAULT
            assert list(tensor(log.predict_log.request.inputs[c.MAX_NEW_TOKENS])) == [3, 3]
        else:
            assert log.log_metadata.model_spec.signature_name == c.GENERATE
    page = running.core.metrics.render()
    assert f'{metrics.REQUEST_LOG_COUNT}{{model_name="lm",status_code="OK"}} {len(sent)}' in page

    # The LLM series, from the step scheduler: whole answers (REST, gRPC, OpenAI) and streams apart.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(page)}
    def value(name, suffix, **labels):
        return sum(s.value for s in families[name].samples if s.name == name + suffix
                   and all(s.labels.get(k) == v for k, v in labels.items()))
    ttft = metrics.TIME_TO_FIRST_TOKEN
    assert value(ttft, "_count", model_name="lm", streamed="false") == 4  # 2 REST rows, gRPC, OpenAI
    assert value(ttft, "_count", model_name="lm", streamed="true") == 2
    assert 0 < value(ttft, "_sum", model_name="lm", streamed="true") < 60
    assert value(metrics.TIME_PER_OUTPUT_TOKEN, "_count", streamed="true") >= 2
    generated = sum(tensor(log.predict_log.response.outputs[c.TOKEN_IDS]).size for log in logs)
    assert value(metrics.GENERATED_TOKENS, "_sum", model_name="lm") == 3 + 3 + 4 + 5 + 5 + 3 == generated
    assert value(metrics.GENERATED_TOKENS, "_count", model_name="lm") == 6
    assert value(metrics.PROMPT_TOKENS, "_count", model_name="lm") == 6
    assert value(metrics.BATCH_SIZE, "_count", model_name="lm") > 0
    assert value(metrics.ACTIVE_ROWS, "", model_name="lm") == 0


def test_sampling_is_reproducible_under_a_seed_and_storage_failures_fail_no_request(served_bases, tmp_path):
    # Two names for one model, each logging at rate 0.25: "lm" where it can, "broken" under a regular
    # file, which cannot be written (as root too): every record sampled there is dropped and counted.
    (tmp_path / "a-file").write_text("")
    kept, broken = str(tmp_path / "kept" / "lm"), str(tmp_path / "a-file" / "lm")
    config = tmp_path / "models.config"
    config.write_text("model_config_list { " + " ".join(
        f'config {{ name: "{name}" base_path: "{served_bases / "transformer"}" logging_config {{ '
        f'{tfrecord(prefix, rate=0.25)} }} }}' for name, prefix in (("lm", kept), ("broken", broken))) + " }")
    running = server.Server.build_and_start(server.Options(
        model_config_file=str(config), port=0, rest_api_port=0, bind_address="127.0.0.1",
        file_system_poll_wait_seconds=0, request_log_seed=7))
    try:
        for name in ("lm", "broken"):
            for i in range(24):
                status, _ = post(("127.0.0.1", running.rest_port), f"/v1/models/{name}:predict",
                                 {"inputs": {"prompt": [f"line {i}"], "max_new_tokens": [1]}})
                assert status == 200
    finally:
        running.stop()
    draws = random.Random(7)  # each logging config samples with its own generator, seeded alike
    expected = [i for i in range(24) if draws.random() < 0.25]
    counts = running.core.metrics.request_log_count
    logged = [tensor(log.predict_log.request.inputs[c.PROMPT])[0].decode() for log in read_logs(kept)]
    assert logged == [f"line {i}" for i in expected] and counts.value("lm", "OK") == len(expected)
    assert counts.value("broken", "UNAVAILABLE") == len(expected) and counts.value("broken", "OK") == 0


def test_files_rotate_and_the_oldest_go_to_stay_within_the_bound(tmp_path):
    reg = metrics.Registry()
    logs = request_log.RequestLogs(request_log.LogOptions(max_file_bytes=3000, max_total_bytes=10_000), reg)
    prefix = str(tmp_path / "logs" / "lm")
    from google.protobuf import text_format
    from tensorflow_serving.config import logging_config_pb2

    config = text_format.Parse(tfrecord(prefix), logging_config_pb2.LoggingConfig())
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "lm-19990101-000000-1-0001.tfrecord").write_bytes(b"x" * 5000)  # an earlier run's
    logs.update({"lm": config})
    for i in range(60):
        logs.predict("lm", 1, c.GENERATE, {c.PROMPT: np.array([f"prompt {i:03d}".encode() * 20], object)},
                     {c.COMPLETION: np.array([b"done"], object)})
    logs.close()
    files = sorted(tf.io.gfile.glob(f"{prefix}-*.tfrecord"))
    sizes = [tf.io.gfile.stat(f).length for f in files]
    assert len(files) >= 3 and sum(sizes) <= 10_000
    assert not (tmp_path / "logs" / "lm-19990101-000000-1-0001.tfrecord").exists()
    assert reg.request_log_deleted.value(prefix) >= 2  # the earlier run's file and this run's first
    assert reg.request_log_count.value("lm", "OK") == 60
    kept = [tensor(log.predict_log.request.inputs[c.PROMPT])[0][:10] for log in read_logs(prefix)]
    assert kept == [f"prompt {i:03d}".encode() for i in range(60 - len(kept), 60)]  # the newest, in order


def test_a_classify_log_holds_the_examples_and_classes(tmp_path):
    reg = metrics.Registry()
    logs = request_log.RequestLogs(request_log.LogOptions(), reg)
    prefix = str(tmp_path / "lm")
    from google.protobuf import text_format
    from tensorflow_serving.config import logging_config_pb2

    logs.update({"reviews": text_format.Parse(tfrecord(prefix), logging_config_pb2.LoggingConfig())})
    example = tf.train.Example(features=tf.train.Features(feature={
        "inputs": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a fine film"]))}))
    logs.classify("reviews", 3, c.CLASSIFY, [example.SerializeToString()],
                  np.array([[b"fresh", b"rotten"]], object), np.array([[0.75, 0.25]], np.float32))
    logs.close()
    [log] = read_logs(prefix)
    assert log.classify_log.request.input.example_list.examples[0] == example
    classes = log.classify_log.response.result.classifications[0].classes
    assert [(k.label, k.score) for k in classes] == [("fresh", 0.75), ("rotten", 0.25)]
    assert log.log_metadata.model_spec.version.value == 3


@pytest.mark.parametrize("logging, message", [
    ('log_collector_config { type: "kafka" filename_prefix: "/x" }', "Cannot find LogCollector::Factory"),
    ('log_collector_config { type: "tfrecord" }', "needs a filename_prefix"),
    ('log_collector_config { type: "tfrecord" filename_prefix: "/x" } sampling_config { sampling_rate: 2 }',
     "sampling_rate must be in [0, 1]"),
])
def test_a_logging_config_this_server_cannot_carry_out_stops_it_at_start(served_bases, tmp_path, logging, message):
    with pytest.raises(ServingError, match=message.replace("[", r"\[")):
        start(tmp_path, served_bases, logging)


def test_the_dashboard_and_alert_rules_use_series_the_server_exports():
    import re

    import yaml

    from tests.helpers import ROOT

    registry = metrics.Registry()
    exported = {m.name for m in vars(registry).values() if isinstance(m, metrics._Metric)}
    dashboard = json.loads((ROOT / "deploy" / "serving" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "deploy" / "serving" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert all(r["alert"] and r["expr"] and r["annotations"]["summary"] for r in rules)
    exprs += [r["expr"] for r in rules]
    names = {name for e in exprs for name in re.findall(r"(:?[a-z_]+(?::[a-z_]+)+)", e)}
    used = {name if name in exported else re.sub(r"_(bucket|sum|count)$", "", name) for name in names}
    assert used and used <= exported, used - exported
    assert {metrics.TIME_TO_FIRST_TOKEN, metrics.TIME_PER_OUTPUT_TOKEN, metrics.REQUEST_LOG_COUNT} <= used
