"""Workdirs on any TensorFlow filesystem: the stages on TensorFlow's in-memory `ram://` filesystem
(an object store stand-in: no atomic directory rename, reached only through tf.io.gfile), and the
publish protocol that replaces rename there (staging prefix, index files last, marker)."""

import json
import os

import pytest
import tensorflow as tf

from tests.helpers import run_cli, tiny_export
from pipelines import fs
from pipelines import workdir as workdir_lib
from pipelines.errors import UserError


def _names_under(root: str) -> list[str]:
    return [os.path.join(r, n) for r, dirs, files in tf.io.gfile.walk(root) for n in dirs + files]


def test_every_stage_runs_on_a_ram_workdir(tmp_path, corpus_file, capsys, monkeypatch):
    """prepare -> train -> evaluate -> generate -> export -> TFLite, every file on ram://, none local."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a URI taken for a local path would show up here as a folder `ram:`
    bucket = f"ram://{tmp_path.name}"
    tf.io.gfile.makedirs(f"{bucket}/corpus")
    tf.io.gfile.copy(str(corpus_file), f"{bucket}/corpus/plays.txt")
    run = f"{bucket}/runs/x"

    def cli(*argv):
        code, out, err = run_cli(capsys, *argv, f"--workdir={run}")
        assert code == 0, err
        return out

    prepared = json.loads(cli("prepare", f"--corpus={bucket}/corpus/*.txt").strip().splitlines()[-1])
    assert prepared["train_tokens"] > 0
    trained = json.loads(cli("train", "--preset=tiny", "--steps=6", "--batch_size=4", "--eval_every=0",
                             "--checkpoint_every=3", "--progress=none").strip().splitlines()[-1])
    assert tf.io.gfile.exists(f"{run}/checkpoints/ckpt-6.index")
    evaluated = json.loads(cli("evaluate").strip().splitlines()[-1])
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)

    generate = ("generate", "--prompt=HAMLET:", "--max_new_tokens=12", "--sampler=greedy")
    keras_text = cli(*generate)
    exported = json.loads(cli("export", "--batch_buckets=1", "--length_buckets=16").strip().splitlines()[-1])
    assert exported["path"] == f"{run}/export/lm/1"
    for name in ("saved_model.pb", "variables/variables.index", workdir_lib.PUBLISHED_MARKER):
        assert tf.io.gfile.exists(f"{run}/export/lm/1/{name}")
    assert cli(*generate, "--backend=savedmodel") == keras_text

    cli("tflite")
    assert tf.io.gfile.exists(f"{run}/tflite/transformer-float32.tflite")
    assert cli(*generate, "--backend=tflite") == keras_text

    assert list(cwd.iterdir()) == []
    leftovers = [n for n in _names_under(run) if "-staging-" in n or n.endswith(".tmp")]
    assert leftovers == []
    for published in ("data", "tokenizer", "tflite/tokenizer"):
        assert tf.io.gfile.exists(f"{run}/{published}/{workdir_lib.PUBLISHED_MARKER}")


def test_a_uri_no_filesystem_handles_is_one_line_and_writes_nothing(tmp_path, corpus_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "prepare", f"--corpus={corpus_file}", "--workdir=nosuchfs://bucket/run")
    assert code == 2
    assert err.count("\n") == 1 and "nosuchfs://" in err and "ram://" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_file_uri_is_the_local_path(tmp_path):
    assert fs.path(f"file://{tmp_path}/run") == tmp_path / "run"
    assert fs.is_local(fs.path("runs/x")) and not fs.is_local(fs.path("ram://b/x"))


def test_publishing_on_an_object_store_commits_with_a_marker(tmp_path):
    final = fs.path(f"ram://{tmp_path.name}/out/dir")
    with pytest.raises(RuntimeError), workdir_lib.publish_dir(final) as staging:
        (staging / "part").write_text("half")
        raise RuntimeError("killed mid-build")
    assert not final.exists() and not final.parent.exists()  # nothing half-written, no parent it made

    with workdir_lib.publish_dir(final) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.bin").write_bytes(b"a")
        (staging / "manifest.json").write_text("{}")
        assert not workdir_lib.published(final)
    assert workdir_lib.published(final)
    assert sorted(str(p.relative_to(final)) for p in fs.files_under(final)) == [
        workdir_lib.PUBLISHED_MARKER, "manifest.json", "sub/a.bin"]

    with pytest.raises(FileExistsError), workdir_lib.publish_dir(final) as staging:
        (staging / "manifest.json").write_text("{}")
    with workdir_lib.publish_dir(final, replace=True) as staging:
        (staging / "manifest.json").write_text('{"new": 1}')
    assert workdir_lib.read_json(final / "manifest.json") == {"new": 1}
    assert not (final / "sub").exists() and workdir_lib.published(final)
    assert [p.name for p in final.parent.iterdir()] == ["dir"]  # the staging prefix is gone


def test_stale_staging_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    import socket
    import subprocess

    parent = fs.path(f"ram://{tmp_path.name}/runs")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = parent / f".data-staging-{dead.pid}-0000@{host}"
    live = parent / f".data-staging-{os.getpid()}-1111@{host}"
    for d in (stale, live):
        (d / "x").parent.mkdir(parents=True, exist_ok=True)
        (d / "x").write_text("left over")
    with workdir_lib.publish_dir(parent / "data") as staging:
        (staging / "manifest.json").write_text("{}")
    assert not stale.exists() and live.exists()


def test_a_data_dir_without_its_marker_is_not_prepared(tmp_path, corpus_file):
    from pipelines import prepare

    run = f"ram://{tmp_path.name}/run"
    prepare.prepare(prepare.PrepareConfig(corpus=(str(corpus_file),)), run)
    wd = workdir_lib.Workdir(run)
    assert wd.is_prepared()
    (wd.data_dir / workdir_lib.PUBLISHED_MARKER).unlink()  # as mid-copy, or a replace half done
    assert not wd.is_prepared()
    with pytest.raises(UserError, match="not a prepared lmstack workdir"):
        wd.read_manifest()


def test_lmstack_serve_reads_versions_from_a_tensorflow_filesystem(tmp_path_factory, english_text, tmp_path):
    """A base path and model config file on ram:// (TensorFlow Serving reads gs:// the same way):
    versions load from there and answer as the SavedModel does; one being copied in, saved_model.pb
    last (how `lmstack export` publishes where nothing renames a directory), loads once complete."""
    from serving import client as client_lib
    from serving import contract as c
    from serving import server

    _, exported = tiny_export("transformer", tmp_path_factory, english_text)
    root = f"ram://{tmp_path.name}"

    def copy_in(version, skip=()):
        for f in sorted(p for p in exported.rglob("*") if p.is_file() and p.name not in skip):
            target = f"{root}/lm/{version}/{f.relative_to(exported).as_posix()}"
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            tf.io.gfile.copy(str(f), target)

    copy_in(1)
    with tf.io.gfile.GFile(f"{root}/models.config", "w") as f:
        f.write(f'model_config_list {{ config {{ name: "lm" base_path: "{root}/lm/" model_platform: "tensorflow" }} }}')
    core = server.ModelServer(server.models_from_config_file(f"{root}/models.config"), model_roots=[])
    core.refresh()
    grpc_server, grpc_port = server.start_grpc(core, 0)
    rest_server, rest_port = server.start_rest(core, 0)
    try:
        client = client_lib.connect(f"localhost:{grpc_port}", "grpc")
        expected = tf.saved_model.load(str(exported)).signatures[c.SERVING_DEFAULT](
            prompt=tf.constant(["ROMEO."]), max_new_tokens=tf.constant([8]))[c.COMPLETION].numpy()[0].decode()
        assert client.generate(["ROMEO."], 8) == [expected]
        copy_in(2, skip={"saved_model.pb"})  # every file but the index: not a version yet
        core.refresh()
        assert [s["version"] for s in client.status()] == [1]
        tf.io.gfile.copy(str(exported / "saved_model.pb"), f"{root}/lm/2/saved_model.pb")
        core.refresh()
        rest = client_lib.connect(f"localhost:{rest_port}", "rest")
        assert [(s["version"], s["state"]) for s in rest.status()] == [(2, "AVAILABLE")]
        with pytest.raises(c.ServingError) as e:  # a reload request may not reach outside the roots
            core.reload({"x": server.ServedModel("x", f"ram://{tmp_path.name}-elsewhere/lm")})
        assert e.value.code == "PERMISSION_DENIED" and "--model_config_roots" in e.value.message
    finally:
        rest_server.shutdown()
        grpc_server.stop(None)
        fs.rmtree(fs.path(root))  # tolerates ram://'s phantom listings
