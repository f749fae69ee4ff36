"""`lmstack prepare --runner=DirectRunner`: the Apache Beam pipeline writes the token streams the
local prepare writes, for the same input and seed."""

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_cli


def _streams(run):
    """(manifest without paths, sha256 of each split's token stream), read back from the shards."""
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    digests = {}
    for split, s in manifest["splits"].items():
        digest = hashlib.sha256()
        for name in s["files"]:
            for record in tf.data.TFRecordDataset(str(run / "data" / name), "GZIP"):
                digest.update(np.frombuffer(record.numpy(), "<i4").tobytes())
        digests[split] = digest.hexdigest()
    for source in manifest["sources"]:
        source.pop("path")
    return manifest, digests


@pytest.mark.slow
def test_beam_direct_runner_writes_the_local_token_streams(tmp_path, english_text, capsys, monkeypatch):
    from pipelines import shards

    monkeypatch.setattr(shards, "PIECE_CHARS", 500)  # blocks tokenized in pieces on both sides
    (tmp_path / "a.txt").write_text(english_text[:15000], encoding="utf-8")
    (tmp_path / "b.txt").write_text(english_text[15000:], encoding="utf-8")
    common = [f"--corpus={tmp_path / '*.txt'}", "--tokenizer=bpe", "--vocab_size=400", "--num_blocks=30",
              "--seed=3", "--shard_tokens=2000", "--record_tokens=100"]
    code, out, err = run_cli(capsys, "prepare", *common, f"--workdir={tmp_path / 'local'}")
    assert code == 0, err
    code, out, err = run_cli(capsys, "prepare", *common, f"--workdir={tmp_path / 'beam'}", "--runner=DirectRunner")
    assert code == 0, err
    assert "Apache Beam (DirectRunner" in err
    local, beam = _streams(tmp_path / "local"), _streams(tmp_path / "beam")
    assert local[0]["splits"]["train"]["tokens"] > 2000 * 2  # several shards, records cut inside them
    assert beam == local
    assert not list((tmp_path / "beam" / "data").glob(".*"))  # the pipeline's answer file is gone


@pytest.mark.parametrize("argv, message", [
    (["--runner=DataflowRunner"], "--runner=DataflowRunner: runs on other machines"),
    (["--runner=DirectRunner", "--beam_options=--no_such_option=1"], "--beam_options=--no_such_option=1"),
])
def test_bad_runner_settings_are_one_line_and_write_nothing(tmp_path, corpus_file, capsys, argv, message):
    code, _, err = run_cli(capsys, "prepare", f"--corpus={corpus_file}", f"--workdir={tmp_path / 'run'}", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
