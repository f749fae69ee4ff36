"""`lmstack pipeline`: one config file through every stage; finished stages are not redone."""

import json

import pytest

from app import pipeline_file, pipeline_run, pipeline_stages
from pipelines.errors import UserError
from tests.helpers import bundled_lines, run_cli

TINY = """
workdir: run
corpus: [corpus.txt]
tokenizer: {kind: char}
models:
  transformer: {preset: tiny}
prepare: {val_fraction: 0.1}
train: {steps: 20, batch_size: 8, warmup_steps: 2, eval_every: 0, checkpoint_every: 20}
optimize: {method: prune, target_sparsity: 0.5, steps: 10, frequency: 2, end_step: 6}
export: {variant: pruned50}
serve: {prompt: "ROMEO.", max_new_tokens: 8, sample_tokens: 12, request_logs: logs/lm}
tflite: {variant: pruned50, quantize: none, prompt: "ROMEO.", max_new_tokens: 8}
report: {latency: false}
"""


def write_config(tmp_path, text=TINY, name="run.yaml"):
    (tmp_path / "corpus.txt").write_text("".join(bundled_lines(2000, 600)), encoding="utf-8")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path



def stage_lines(err: str) -> dict[str, str]:
    """'transformer train' -> 'up to date' | 'done' | 'skipped', from the per-stage progress lines."""
    result = {}
    for line in err.splitlines():
        if line.startswith("[") and ": " in line:
            head, what = line.split("] ", 1)[1].split(": ", 1)
            result[head] = what.split(" ", 1)[0] if not what.startswith("up to date") else "up to date"
    return result


@pytest.mark.slow
def test_every_stage_runs_once_and_a_changed_setting_reruns_only_what_depends_on_it(tmp_path, capsys):
    config = write_config(tmp_path)
    code, out, err = run_cli(capsys, "pipeline", f"--config={config}")
    assert code == 0, err
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]
    assert set(state) == {f"transformer/{s}" for s in pipeline_stages.STAGES}
    served = state["transformer/serve"]["result"]
    assert served["rest"]["completion"] == served["grpc"]["completion"] != ""  # greedy: both protocols agree
    assert state["transformer/tflite"]["result"]["completion"] != ""
    assert (tmp_path / "run" / "transformer" / "report" / "report.md").is_file()
    assert "| transformer | pruned50 |" in err and "artifacts:" in err
    # The summary ends with what the served model writes, sampled, after the prompt.
    assert served["sample"] and "samples:" in err
    assert "transformer, served, temperature 0.8:\n\n    ROMEO." + served["sample"].splitlines()[0] in err
    # The server logged the stage's three requests (REST, gRPC, the sample) beside the config file.
    import tensorflow as tf
    assert served["request_logs"] == str(tmp_path / "logs" / "lm")
    assert sum(1 for _ in tf.data.TFRecordDataset(tf.io.gfile.glob(f"{tmp_path}/logs/lm-*.tfrecord"))) == 3
    assert json.loads(out)["workdir"] == str(tmp_path / "run")

    code, _, err = run_cli(capsys, "pipeline", f"--config={config}")
    assert code == 0 and set(stage_lines(err).values()) == {"up to date"}

    config.write_text(TINY.replace("quantize: none", "quantize: dynamic, format: litertlm"))
    code, _, err = run_cli(capsys, "pipeline", f"--config={config}", "--skip=serve")
    assert code == 0, err
    lines = stage_lines(err)
    assert lines["transformer tflite"] == lines["transformer report"] == "done"
    assert lines["transformer serve"] == "skipped"
    assert all(lines[f"transformer {s}"] == "up to date" for s in ("prepare", "train", "evaluate", "optimize",
                                                                   "export"))
    tflite_dir = tmp_path / "run" / "transformer" / "tflite"
    assert (tflite_dir / "transformer-pruned50-dynamic.tflite").is_file()
    assert not (tflite_dir / "transformer-pruned50-float32.tflite").exists()
    # A LiteRT-LM bundle of the same file, listed by the report with the figures of the file inside it.
    assert (tflite_dir / "transformer-pruned50-dynamic.litertlm").is_file()
    rows = {(r["variant"], r["method"]): r for r in json.loads(
        (tmp_path / "run" / "transformer" / "report" / "report.json").read_text())}
    inside, bundle = rows["transformer-pruned50-dynamic", "tflite"], rows["transformer-pruned50-dynamic", "litertlm"]
    assert bundle["bits_per_char"] == inside["bits_per_char"] and bundle["tflite_bytes"] > inside["tflite_bytes"]


@pytest.mark.parametrize("text, message", [
    ("workdir: run\ncorpus: [c.txt]\nmodels: {transformer: {}}\ntrian: {}\n", "unknown key(s) trian"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {gpt: {}}\n", "`models` maps families"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\ntrain: {stpes: 3}\n", "train.stpes: no such setting"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\nskip: [deploy]\n", "cannot skip deploy"),
    ("workdir: run\nmodels: {lstm: {}}\n", "`corpus` is required"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {width: 3}}\n", "models.lstm.width: no such setting"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {train: {stpes: 3}}}\n",
     "models.lstm.train.stpes: no such setting"),
    # Values are checked against the settings' types before any stage runs.
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\ntrain: {steps: many}\n",
     "train.steps: expected a value of type int (got many)"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\ntflite: {quantize: int4}\nskip: [optimize]\n",
     "tflite.quantize: expected one of none|float16|dynamic|int8 (got int4)"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\ntflite: {batch_size: 0}\nskip: [optimize]\n",
     "tflite.batch_size: must be at least 1 (got 0)"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {cell: rnn}}\n", "models.lstm.cell: expected one of lstm|gru"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {preset: huge}}\n", "models.lstm.preset: expected one of"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\nserve: {max_new_tokens: 2.5}\nskip: [optimize]\n",
     "serve.max_new_tokens: expected a value of type int"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\n", "optimize.method: is required"),
    # Wrong shapes of the file's own keys: one line each, never a traceback.
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\ntokenizer: char\nskip: [optimize]\n",
     "`tokenizer` holds settings such as {kind: char}"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\ntokenizer: {kind: unigram}\nskip: [optimize]\n",
     "tokenizer.kind: expected one of char|byte|wordpiece|sentencepiece|bpe (got unigram)"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: 3}\n", "`models` maps families"),
    ("workdir: run\ncorpus: 5\nmodels: {lstm: {}}\n", "`corpus` is a file or a list of files"),
    ("workdir: [a]\ncorpus: [c.txt]\nmodels: {lstm: {}}\n", "`workdir` is a path"),
    ("workdir: run\ncorpus: [c.txt]\nmodels: {lstm: {}}\nskip: [1]\n", "`skip` is a list of stages"),
    ("workdir: run\ncorpus: [c.txt\n", "not valid YAML"),
])
def test_bad_config_is_one_line_and_exit_2(text, message, tmp_path, capsys):
    config = write_config(tmp_path, text)
    code, _, err = run_cli(capsys, "pipeline", f"--config={config}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_json_configs_read_like_yaml(tmp_path):
    config = write_config(tmp_path, json.dumps({"workdir": "run", "corpus": "corpus.txt",
                                                "models": {"lstm": {"preset": "tiny"}}, "skip": ["serve"],
                                                "optimize": {"method": "prune"}}),
                          name="run.json")
    loaded = pipeline_file.load_config(config)
    assert loaded.workdir == tmp_path / "run" and loaded.corpus == (str(tmp_path / "corpus.txt"),)
    assert loaded.skip == ("serve",) and loaded.models == {"lstm": {"preset": "tiny"}}
    with pytest.raises(UserError, match="--rerun: unknown stage"):
        pipeline_run.Pipeline(loaded, progress=None, rerun=("deploy",))
