import gzip

import pytest

from pipelines import corpus
from pipelines.errors import UserError


def test_globs_expand_sorted_and_files_keep_their_order(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name)
    paths = corpus.resolve_paths([str(tmp_path / "c.md"), str(tmp_path / "*.txt")])
    assert [p.name for p in paths] == ["c.md", "a.txt", "b.txt"]


def test_the_same_file_twice_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert len(corpus.resolve_paths([str(tmp_path / "a.txt"), str(tmp_path / "*.txt")])) == 1


@pytest.mark.parametrize("pattern, message", [
    ("missing.txt", "no such file"),
    ("*.nothing", "matches no file"),
    (".", "is a directory"),
])
def test_bad_paths_name_the_problem(tmp_path, monkeypatch, pattern, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        corpus.resolve_paths([pattern])


def test_gzip_bom_and_crlf(tmp_path):
    path = tmp_path / "t.txt.gz"
    path.write_bytes(gzip.compress("\ufeffline one\r\nline two\rthree\n".encode("utf-8")))
    doc = corpus.read_document(path)
    assert doc.text == "line one\nline two\nthree\n"
    assert doc.size == path.stat().st_size and len(doc.sha256) == 64


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok".encode("utf-8") + b" na\xefve")
    with pytest.raises(UserError) as e:
        corpus.read_document(path)
    assert "latin1.txt" in str(e.value) and "byte 11" in str(e.value)
    assert "encoding_errors=replace" in str(e.value)
    assert corpus.read_document(path, "replace").text == "caf\u00e9 ok na\ufffdve"


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="corpus is empty"):
        corpus.read_corpus([str(tmp_path / "empty.txt")])


def _docs(*texts):
    return [corpus.Document(f"/d{i}", "0" * 64, len(t), t) for i, t in enumerate(texts)]


def test_blocks_are_whole_lines_and_never_cross_documents():
    docs = _docs("".join(f"a{i}\n" for i in range(50)), "".join(f"b{i}\n" for i in range(30)))
    blocks = corpus.make_blocks(docs, num_blocks=10)
    assert "".join(b.text for b in blocks) == docs[0].text + docs[1].text
    assert all(b.text.endswith("\n") for b in blocks)
    assert all(set(line[0] for line in b.text.splitlines()) == {"ab"[b.doc]} for b in blocks)


def test_split_is_seeded_contiguous_and_complete():
    docs = _docs("".join(f"line {i}\n" for i in range(1000)))
    blocks = corpus.make_blocks(docs, num_blocks=100)
    train, val, idx = corpus.split_blocks(blocks, 0.1, seed=3)
    assert len(val) == 10 and len(train) == len(blocks) - 10
    assert corpus.split_blocks(blocks, 0.1, seed=3)[2] == idx
    assert corpus.split_blocks(blocks, 0.1, seed=4)[2] != idx
    train_lines = {line for b in train for line in b.text.splitlines()}
    val_lines = {line for b in val for line in b.text.splitlines()}
    assert not train_lines & val_lines
    assert len(train_lines | val_lines) == 1000


def test_too_small_to_hold_out():
    blocks = corpus.make_blocks(_docs("one line\n"), num_blocks=100)
    with pytest.raises(UserError, match="too few lines"):
        corpus.split_blocks(blocks, 0.1, seed=0)
