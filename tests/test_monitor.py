"""`lmstack monitor`: request logs (TensorFlow Serving's PredictionLog protos) against the workdir's
training data and model, on real text: in-domain prompts stay quiet, another domain is flagged."""

import bz2
import csv
import json

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from pipelines import monitor, report
from pipelines import workdir as workdir_lib
from tests.helpers import ROOT, bundled_lines, run_cli, tiny_export

HOUR = 3600
T0 = 1_796_000_000 // HOUR * HOUR


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, english_text):
    return tiny_export("transformer", tmp_path_factory, english_text)[0]


def shakespeare(count: int) -> list[str]:
    """Lines of plays the tiny model was not trained on (its corpus is lines 2000-2400)."""
    return [line.strip() for line in bundled_lines(60000, 4 * count) if len(line.strip()) > 20][:count]


def reviews(count: int) -> list[str]:
    with bz2.open(ROOT / "data" / "reviews.csv.bz2", "rt", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)][:count]


def write_logs(prefix: str, windows: list[tuple[int, list[str]]]) -> None:
    """One Predict log of `generate` per prompt, as `lmstack serve` writes them, at the given times."""
    with tf.io.TFRecordWriter(f"{prefix}-20261207-000000-1-0001.tfrecord") as writer:
        for stamp, prompts in windows:
            for prompt in prompts:
                log = prediction_log_pb2.PredictionLog()
                log.log_metadata.model_spec.name = "lm"
                log.log_metadata.timestamp_secs = stamp
                log.predict_log.request.inputs["prompt"].CopyFrom(tf.make_tensor_proto(np.array([prompt.encode()])))
                log.predict_log.response.outputs["completion"].CopyFrom(tf.make_tensor_proto(np.array([b"and so"])))
                writer.write(log.SerializeToString())


def test_in_domain_prompts_pass_and_another_domain_is_flagged(workdir, tmp_path, capsys):
    prefix = str(tmp_path / "logs" / "lm")
    tf.io.gfile.makedirs(str(tmp_path / "logs"))
    write_logs(prefix, [(T0 + 60, shakespeare(120)), (T0 + HOUR + 60, shakespeare(120)[::-1]),
                        (T0 + 2 * HOUR + 60, reviews(120))])
    status, out, err = run_cli(capsys, "monitor", f"--logs={prefix}", f"--workdir={workdir}", "--window=1h")
    assert status == 1, err
    assert json.loads(out)["drifted"] == [T0 + 2 * HOUR]
    result = json.loads((workdir / "monitor" / "monitor.json").read_text())
    quiet, _, drifted = result["windows"]
    assert quiet["drift"] == [] and quiet["judged"] and quiet["requests"] == 120
    assert "js_excess" in drifted["drift"]
    assert drifted["js_excess"] > result["thresholds"]["max_js_excess"] > quiet["js_excess"]
    assert (workdir / "monitor" / "monitor.png").stat().st_size > 10_000
    assert "| window (UTC) |" in err and "1 of 3 windows drifted" in err
    # `lmstack report` shows the last monitor run.
    section = "\n".join(report.monitor_section(workdir_lib.Workdir(workdir)))
    assert "**1 of 3 windows drifted**" in section and "| window (UTC) |" in section
    assert "![monitor](../monitor/monitor.png)" in section

    # Only the in-domain hours: exit 0.
    status, out, err = run_cli(capsys, "monitor", f"--logs={prefix}", f"--workdir={workdir}", "--window=1h",
                               "--model=lm", "--max_js_excess=0.9", "--max_unk_rate=1", "--max_perplexity_ratio=100")
    assert status == 0 and json.loads(out)["drift"] is False, err


@pytest.mark.parametrize("args, message", [
    (["--window=soon"], "--window=soon: a duration"),
    (["--logs=/nonexistent/lm"], "no request logs /nonexistent/lm-*.tfrecord"),
    (["--model=other"], "no logged prompts for model 'other'"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys, args, message):
    prefix = str(tmp_path / "lm")
    write_logs(prefix, [(T0, shakespeare(3))])
    status, out, err = run_cli(capsys, "monitor", f"--logs={prefix}", f"--workdir={workdir}", *args)
    assert status == 2 and message in err and "Traceback" not in err


def test_js_divergence_is_zero_for_equal_and_one_for_disjoint():
    assert monitor.js_divergence(np.array([3.0, 1, 0]), np.array([6.0, 2, 0])) == pytest.approx(0, abs=1e-12)
    assert monitor.js_divergence(np.array([1.0, 0]), np.array([0.0, 5])) == pytest.approx(1.0)
