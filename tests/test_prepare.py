import json
import os

import pytest

from pipelines import prepare as prepare_lib
from pipelines import tokenizers
from pipelines.errors import UserError
from tests.helpers import run_cli


def config(*corpus, kind="char", **kw):
    return prepare_lib.PrepareConfig(corpus=tuple(str(c) for c in corpus),
                                     tokenizer=tokenizers.TokenizerConfig(kind), **kw)


def snapshot(root):
    """Every file under root with its bytes: to prove nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_writes_the_workdir_contract(tmp_path, corpus_file, english_text):
    result = prepare_lib.prepare(config(corpus_file), tmp_path / "run")
    root = tmp_path / "run"
    assert not result.reused
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "data", "tokenizer"]
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest == result.manifest
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["files"]) >= 8  # file auto-sharding can feed 8 workers
    assert all((root / "data" / f).is_file() for f in train["files"] + val["files"])
    assert sum(train["shard_tokens"]) == train["tokens"]
    assert train["chars"] + val["chars"] == len(english_text)
    # char tokenizer: one token per character, plus the [EOS] closing the document in each split
    assert train["tokens"] + val["tokens"] == len(english_text) + 2
    assert 0.05 < val["chars"] / len(english_text) < 0.2
    assert manifest["sources"][0]["sha256"] and manifest["tokenizer"]["kind"] == "char"
    saved = json.loads((root / "config.json").read_text())["prepare"]
    assert saved["corpus"] == [str(corpus_file)] and saved["val_fraction"] == 0.1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left


def test_rerun_with_the_same_inputs_reuses_the_workdir(tmp_path, corpus_file):
    prepare_lib.prepare(config(corpus_file), tmp_path / "run")
    before = snapshot(tmp_path / "run")
    mtime = os.stat(tmp_path / "run" / "config.json").st_mtime_ns
    again = prepare_lib.prepare(config(corpus_file), tmp_path / "run")
    assert again.reused and snapshot(tmp_path / "run") == before
    assert os.stat(tmp_path / "run" / "config.json").st_mtime_ns == mtime


def test_other_inputs_need_overwrite(tmp_path, corpus_file):
    run = tmp_path / "run"
    prepare_lib.prepare(config(corpus_file), run)
    (run / "checkpoints").mkdir()  # a later stage's output, built on the old data
    before = snapshot(run)
    with pytest.raises(UserError, match="--overwrite"):
        prepare_lib.prepare(config(corpus_file, kind="byte"), run)
    assert snapshot(run) == before
    result = prepare_lib.prepare(config(corpus_file, kind="byte"), run, overwrite=True)
    assert result.manifest["tokenizer"]["kind"] == "byte"
    assert not (run / "checkpoints").exists()


def test_refuses_a_directory_that_is_not_a_workdir(tmp_path, corpus_file):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an lmstack workdir"):
        prepare_lib.prepare(config(corpus_file), tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_same_seed_same_shards_other_seed_other_split(tmp_path, corpus_file):
    a = prepare_lib.prepare(config(corpus_file, seed=1), tmp_path / "a").manifest
    b = prepare_lib.prepare(config(corpus_file, seed=1), tmp_path / "b").manifest
    c = prepare_lib.prepare(config(corpus_file, seed=2), tmp_path / "c").manifest
    assert snapshot(tmp_path / "a" / "data") == snapshot(tmp_path / "b" / "data")
    assert a["split"]["val_blocks"] == b["split"]["val_blocks"] != c["split"]["val_blocks"]


def test_wordpiece_and_sentencepiece_workdirs(tmp_path, corpus_file):
    for kind, size in (("wordpiece", 300), ("sentencepiece", 200)):
        cfg = prepare_lib.PrepareConfig(corpus=(str(corpus_file),),
                                        tokenizer=tokenizers.TokenizerConfig(kind, size))
        manifest = prepare_lib.prepare(cfg, tmp_path / kind).manifest
        train = manifest["splits"]["train"]
        assert manifest["tokenizer"]["vocab_size"] <= size
        assert train["tokens"] < train["chars"] * 0.75


# --- bad input through the command line: one line, exit 2, nothing written ---


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("lmstack prepare: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "vocab_too_small", "unwritable", "bad_fraction"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, corpus_file, case):
    run = tmp_path / "run"
    args = [f"--corpus={corpus_file}", f"--workdir={run}"]
    expect = {
        "missing": "no such file", "empty": "corpus is empty", "not_utf8": "not valid UTF-8 at byte 3",
        "vocab_too_small": "--vocab_size=3: too small", "unwritable": "cannot write to workdir",
        "bad_fraction": "--val_fraction=1.5",
    }[case]
    if case == "missing":
        args[0] = f"--corpus={tmp_path / 'nope.txt'}"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args[0] = f"--corpus={tmp_path / 'empty.txt'}"
    elif case == "not_utf8":
        (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfe def")
        args[0] = f"--corpus={tmp_path / 'bad.txt'}"
    elif case == "vocab_too_small":
        args.append("--vocab_size=3")
    elif case == "unwritable":
        (tmp_path / "a-file").write_text("x")  # a workdir below a file cannot be created, even by root
        run = tmp_path / "a-file" / "run"
        args[1] = f"--workdir={run}"
    elif case == "bad_fraction":
        args.append("--val_fraction=1.5")
    code, out, err = run_cli(capsys, "prepare", *args)
    assert code == 2
    assert expect in error_line(err)
    assert not run.exists()


def test_not_utf8_then_replace_goes_on(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"abc\xff def\n" * 50)
    code, out, err = run_cli(capsys, "prepare", f"--corpus={tmp_path / 'bad.txt'}", f"--workdir={tmp_path / 'run'}",
                             "--encoding_errors=replace")
    assert code == 0, err
    vocab = json.loads((tmp_path / "run" / "tokenizer" / "vocabulary.json").read_text())
    assert "\ufffd" in vocab


def test_cli_prints_a_summary_for_people_and_json_for_scripts(tmp_path, capsys, corpus_file):
    code, out, err = run_cli(capsys, "prepare", f"--corpus={corpus_file}", f"--workdir={tmp_path / 'run'}")
    assert code == 0, err
    assert "train" in err and "vocabulary" in err and "tokenizing the corpus" in err
    result = json.loads(out)
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert result == {"workdir": str(tmp_path / "run"), "reused": False,
                      "vocab_size": manifest["tokenizer"]["vocab_size"],
                      "train_tokens": manifest["splits"]["train"]["tokens"],
                      "val_tokens": manifest["splits"]["val"]["tokens"]}
    code, out, err = run_cli(capsys, "prepare", f"--corpus={corpus_file}", f"--workdir={tmp_path / 'run'}")
    assert code == 0 and json.loads(out)["reused"] is True


def _shard_tokens(run, split):
    import numpy as np
    import tensorflow as tf

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    records = [np.frombuffer(r.numpy(), "<i4") for f in manifest["splits"][split]["files"]
               for r in tf.data.TFRecordDataset(str(run / "data" / f), "GZIP")]
    return np.concatenate(records).tolist()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streamed_shards_hold_each_splits_blocks_tokenized_whole(tmp_path, english_text, monkeypatch, kind):
    """prepare reads a chunk at a time and tokenizes a block in pieces; the shards still hold what
    the definition says: the corpus's blocks of whole lines, split by seed, each block tokenized
    whole, [EOS] after a document's last block in its split."""
    import gzip

    from pipelines import corpus, shards

    monkeypatch.setattr(corpus, "CHUNK_BYTES", 257)  # chunk ends inside lines, CRLFs and UTF-8 sequences
    monkeypatch.setattr(shards, "PIECE_CHARS", 300)  # every block cut into pieces
    first = tmp_path / "a.txt.gz"
    first.write_bytes(gzip.compress(("\ufeff" + english_text[:9000]).replace("\n", "\r\n").encode()))
    second = tmp_path / "b.txt"
    # Blank lines before indented ones: GPT-2's split makes "\n\n " one piece, a cut between the
    # line breaks would not.
    verse = "".join(f"line {i}\n\n    indented {i}\n" for i in range(150))
    second.write_text("naïve café — 漢字\n" + verse + english_text[9000:], encoding="utf-8")
    cfg = prepare_lib.PrepareConfig(corpus=(str(first), str(second)), num_blocks=12, val_fraction=0.25, seed=1,
                                    tokenizer=tokenizers.TokenizerConfig(kind, 1000 if kind == "bpe" else 0))
    prepare_lib.prepare(cfg, tmp_path / "run")

    docs = corpus.read_corpus(cfg.corpus)
    train, val, _ = corpus.split_blocks(corpus.make_blocks(docs, cfg.num_blocks), cfg.val_fraction, cfg.seed)
    tokenizer = tokenizers.load(tmp_path / "run" / "tokenizer")
    for split, blocks in (("train", train), ("val", val)):
        expected = []
        for i, block in enumerate(blocks):
            expected += [int(t) for t in tokenizer.tokenize(block.text)]
            if i + 1 == len(blocks) or blocks[i + 1].doc != block.doc:
                expected.append(tokenizer.eos_id)
        assert _shard_tokens(tmp_path / "run", split) == expected


def test_a_large_corpus_teaches_the_tokenizer_from_a_spread_sample(tmp_path, english_text, monkeypatch):
    learned = []
    learn = tokenizers.learn
    monkeypatch.setattr(tokenizers, "learn", lambda cfg, lines, d: learn(cfg, learned.extend(lines) or learned, d))
    monkeypatch.setattr(prepare_lib, "LEARN_SAMPLE_CHARS", 4000)
    (tmp_path / "c.txt").write_text(english_text, encoding="utf-8")
    prepare_lib.prepare(config(tmp_path / "c.txt", kind="bpe", num_blocks=20, val_fraction=0.1), tmp_path / "run")
    train_chars = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())["splits"]["train"]["chars"]
    sample = sum(len(line) + 1 for line in learned)
    assert 4000 * 0.5 < sample < 4000 * 1.5 < train_chars  # about the cap, from a corpus many times larger
    lines = english_text.splitlines()
    where = sorted({lines.index(line) for line in learned if line.strip() and lines.count(line) == 1})
    assert where[0] < len(lines) // 4 and where[-1] > 3 * len(lines) // 4  # spread over the corpus, not its start
