"""`prepare`: corpus -> tokenizer -> token shards in a workdir.

Reads the corpus, splits it into train and validation blocks, learns the
tokenizer on the training text, tokenizes both splits with the tokenizer's own
TensorFlow graph (the one that serving will run), and writes:

    WORKDIR/tokenizer/               tokenizer.json + vocabulary or model
    WORKDIR/data/{train,val}-*.tfrecord.gz
    WORKDIR/data/manifest.json       files, counts, input hashes, tokenizer config
    WORKDIR/config.json              the run's config; written last, it commits the stage

tokenizer/ and data/ are built in staging directories and renamed into place
(`workdir.publish_dir`), and config.json is written last, so a failed or
interrupted run leaves the workdir as it was or not prepared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import tensorflow as tf

from pipelines import corpus as corpus_lib
from pipelines import fs
from pipelines import tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_at_least, check_choice
from pipelines.progress import Progress

MANIFEST_FORMAT = 1
SPLITS = ("train", "val")
# Tokenizers other than char learn from at most this much training text: a sample of whole blocks
# spread over the corpus when it holds more (their trainers keep their text in memory).
LEARN_SAMPLE_CHARS = 50_000_000
# Blocks are tokenized in pieces of about this many characters (`_pieces`).
PIECE_CHARS = 1 << 20
# zlib level of the shards: 3 writes int32 token records ~3x faster than the default 6, files ~17 % larger.
SHARD_GZIP_LEVEL = 3


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """How to turn a corpus into a tokenizer and token shards.

    Attributes:
        corpus: text files or globs, read in this order (.gz is decompressed).
        tokenizer: which tokenizer to learn.
        val_fraction: share of the corpus held out for validation, in blocks of lines, in [0, 1).
        seed: picks the validation blocks.
        encoding_errors: on bytes that are not UTF-8: stop (strict) or use U+FFFD (replace).
        num_blocks: the corpus is cut into about this many blocks of whole lines for the split.
        shard_tokens: at most this many tokens per shard.
        min_train_shards: at least this many training shards, so file-based auto-sharding can feed
            that many workers.
        min_val_shards: at least this many validation shards.
        record_tokens: tokens per TFRecord record.
    """
    corpus: tuple[str, ...]
    tokenizer: tokenizers.TokenizerConfig = tokenizers.TokenizerConfig()
    val_fraction: float = 0.1
    seed: int = 0
    encoding_errors: Literal["strict", "replace"] = "strict"
    num_blocks: int = 100
    shard_tokens: int = 1_000_000
    min_train_shards: int = 8
    min_val_shards: int = 2
    record_tokens: int = 4096

    def validate(self) -> None:
        self.tokenizer.validate()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "expected a fraction in [0, 1), such as 0.1")
        check_choice("encoding_errors", self.encoding_errors, corpus_lib.ENCODING_ERRORS)
        check_at_least(self, 1, "num_blocks", "shard_tokens", "min_train_shards", "min_val_shards", "record_tokens")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"corpus": list(self.corpus)}


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What `prepare` did: `reused` is True when the workdir was already up to date."""
    workdir: workdir_lib.Workdir
    manifest: dict[str, Any]
    reused: bool


def prepare(config: PrepareConfig, workdir: str | os.PathLike, overwrite: bool = False,
            progress: Progress | None = None) -> PrepareResult:
    """Builds (or reuses) the tokenizer and token shards of a workdir.

    Args:
        config: what to read and how to tokenize it.
        workdir: the run directory; created if missing.
        overwrite: replace a workdir prepared from other inputs (and every later
            stage's outputs in it, which were built from the old data).
        progress: where progress goes; silent by default.
    Returns:
        The manifest and whether the existing workdir was reused.
    Raises:
        UserError: bad input; the workdir is left as it was.
    """
    progress = progress or Progress()
    config.validate()
    wd = workdir_lib.Workdir(workdir)
    paths, sources = corpus_lib.scan_corpus(config.corpus, config.encoding_errors)
    progress.note(f"read {len(sources)} file(s), {sum(s.size for s in sources) / 1e6:.1f} MB")
    fingerprint = _fingerprint(config, sources)

    if wd.is_imported():
        return _prepare_imported(config, wd, paths, sources, fingerprint, overwrite, progress)
    if wd.root.exists():
        _check_existing(wd, fingerprint, overwrite)
        if wd.is_prepared() and not overwrite:
            progress.note(f"{wd.root} is already prepared from these inputs; reusing it")
            return PrepareResult(wd, wd.read_manifest(), reused=True)
    created = workdir_lib.ensure_writable_dir(wd.root)
    try:
        with workdir_lib.publish_dir(wd.tokenizer_dir, replace=True) as tok_dir, \
                workdir_lib.publish_dir(wd.data_dir, replace=True) as data_dir:
            manifest = _build(config, paths, sources, fingerprint, tok_dir, data_dir, progress)
            # Old outputs (with --overwrite) or uncommitted leftovers of a crashed run.
            removed = workdir_lib.remove_stage_outputs(wd)
            if removed and overwrite:
                progress.note(f"--overwrite: replaced {', '.join(removed)} in {wd.root}")
        workdir_lib.write_json(wd.config_path, {
            "lmstack_config_version": 1,
            "prepare": config.to_json() | {"fingerprint": fingerprint},
        })
    except BaseException:
        if created:
            _remove_if_empty(wd.root)
        raise
    return PrepareResult(wd, manifest, reused=False)


def _prepare_imported(config: PrepareConfig, wd: workdir_lib.Workdir, paths: Sequence[fs.Path],
                      sources: Sequence[corpus_lib.Source],
                      fingerprint: str, overwrite: bool, progress: Progress) -> PrepareResult:
    """Token shards for a workdir made by `lmstack import`, with its own tokenizer.

    Only data/ is (re)built: the model and tokenizer came from the checkpoint,
    and new data does not invalidate them.
    """
    if config.tokenizer != tokenizers.TokenizerConfig():
        raise UserError(f"{wd.root} holds an imported model, which reads text with its own tokenizer; "
                        "drop --tokenizer, --vocab_size and --lowercase")
    old = wd.read_config().get("prepare", {})
    if wd.is_prepared() and old.get("fingerprint") == fingerprint:
        progress.note(f"{wd.root} is already prepared from these inputs; reusing it")
        return PrepareResult(wd, wd.read_manifest(), reused=True)
    if wd.is_prepared() and not overwrite:
        raise UserError(f"{wd.root} was prepared from other inputs or settings; pass --overwrite to replace "
                        "its data (the imported model and what was trained from it stay)")
    with workdir_lib.publish_dir(wd.data_dir, replace=True) as data_dir:
        manifest = _build(config, paths, sources, fingerprint, wd.tokenizer_dir, data_dir, progress, learn=False)
    wd.update_config("prepare", config.to_json() | {"fingerprint": fingerprint})
    return PrepareResult(wd, manifest, reused=False)


def summary(manifest: dict[str, Any]) -> str:
    """A short human summary of a manifest: documents, characters, tokens, vocabulary, shards."""
    tok = manifest["tokenizer"]
    rows = [("split", "documents", "characters", "tokens", "chars/token", "shards")]
    for name in SPLITS:
        s = manifest["splits"][name]
        ratio = f"{s['chars'] / s['tokens']:.2f}" if s["tokens"] else "-"
        rows.append((name, f"{s['documents']:,}", f"{s['chars']:,}", f"{s['tokens']:,}", ratio, str(len(s["files"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"tokenizer: {tok['kind']}, vocabulary {tok['vocab_size']:,} tokens")
    return "\n".join(lines)


def _check_existing(wd: workdir_lib.Workdir, fingerprint: str, overwrite: bool) -> None:
    if not wd.root.is_dir():
        raise UserError(f"workdir {wd.root} exists and is not a directory; choose another --workdir")
    foreign = [p.name for p in wd.root.iterdir()
               if p.name not in workdir_lib.STAGE_OUTPUTS and not p.name.startswith(".")]
    if foreign:
        raise UserError(
            f"{wd.root} is not an lmstack workdir (it holds {', '.join(sorted(foreign)[:3])}); "
            "choose a new or empty --workdir")
    if wd.is_prepared() and not overwrite:
        old = workdir_lib.read_json(wd.config_path).get("prepare", {})
        if old.get("fingerprint") != fingerprint:
            raise UserError(
                f"{wd.root} was prepared from other inputs or settings; pass --overwrite to "
                "replace it (and every stage built on it), or choose another --workdir")


def _fingerprint(config: PrepareConfig, sources: Sequence[corpus_lib.Source]) -> str:
    """Hash of the input bytes and every setting that shapes the output (not the paths)."""
    settings = config.to_json()
    del settings["corpus"]
    blob = json.dumps({"inputs": [s.sha256 for s in sources], "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _build(config: PrepareConfig, paths: Sequence[fs.Path], sources: Sequence[corpus_lib.Source], fingerprint: str,
           tok_dir: fs.Path, data_dir: fs.Path, progress: Progress, learn: bool = True) -> dict[str, Any]:
    """Tokenizer and shards from a corpus streamed a block at a time: memory does not grow with the corpus.

    The files are read three times (blocks' sizes, learning, tokenizing); token ids wait in a local
    scratch file (2 or 4 bytes a token) until each split's count fixes the shard bounds.
    """
    errors = config.encoding_errors
    target = corpus_lib.block_target(sum(s.chars for s in sources), config.num_blocks)

    def blocks():
        return corpus_lib.iter_blocks(paths, target, errors)

    sizes, doc_of = [], []
    for block in blocks():
        sizes.append(len(block.text))
        doc_of.append(block.doc)
    val_idx = corpus_lib.validation_blocks(len(sizes), config.val_fraction, config.seed)
    split_of = ["train"] * len(sizes)
    for i in val_idx:
        split_of[i] = "val"

    if learn:
        progress.note(f"learning the {config.tokenizer.kind} tokenizer on the training text")
        tokenizers.learn(config.tokenizer, _learning_lines(blocks(), split_of, sizes, config.tokenizer.kind), tok_dir)
    tokenizer = tokenizers.load(tok_dir)

    # [EOS] closes each document's last block in its split.
    last = {}
    for i, (doc, split) in enumerate(zip(doc_of, split_of)):
        last[doc, split] = i
    eos_after = {i for i in last.values()}
    dtype = np.uint16 if tokenizer.vocabulary_size() <= 1 << 16 else np.int32
    with tempfile.TemporaryDirectory(prefix="lmstack-prepare-") as scratch:
        files = {name: open(os.path.join(scratch, name), "wb") for name in SPLITS}  # noqa: SIM115
        counts = dict.fromkeys(SPLITS, 0)
        try:
            for i, ids, eos in _tokenized(tokenizer, blocks(), config.tokenizer.kind, eos_after):
                if eos:
                    ids = np.append(ids, tokenizer.eos_id)
                ids.astype(dtype).tofile(files[split_of[i]])
                counts[split_of[i]] += ids.size
                progress.count("tokenizing the corpus", i + 1, len(sizes), "blocks")
        finally:
            for f in files.values():
                f.close()
        splits = {}
        for name, min_shards in (("train", config.min_train_shards), ("val", config.min_val_shards)):
            names, shard_sizes = _write_shards(os.path.join(scratch, name), dtype, counts[name], data_dir, name,
                                               config, min_shards, progress)
            members = [i for i, split in enumerate(split_of) if split == name]
            splits[name] = {
                "files": names, "shard_tokens": shard_sizes, "tokens": counts[name],
                "chars": sum(sizes[i] for i in members),
                "documents": len({doc_of[i] for i in members}), "blocks": len(members),
            }
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fingerprint,
        "sources": [{"path": s.path, "sha256": s.sha256, "bytes": s.size} for s in sources],
        "tokenizer": tokenizers.load_config(tok_dir),
        "split": {"val_fraction": config.val_fraction, "seed": config.seed,
                  "blocks": len(sizes), "val_blocks": val_idx},
        "record_tokens": config.record_tokens,
        "splits": splits,
    }
    workdir_lib.write_json(data_dir / workdir_lib.MANIFEST_FILE, manifest)
    return manifest


def _learning_lines(blocks: Iterator[corpus_lib.Block], split_of: Sequence[str], sizes: Sequence[int],
                    kind: str) -> Iterator[str]:
    """The training text's lines the tokenizer learns from: all of it for `char` (counted as it
    streams), else every k-th training block so that at most LEARN_SAMPLE_CHARS are held."""
    train_chars = sum(n for n, split in zip(sizes, split_of) if split == "train")
    stride = 1 if kind == "char" else max(1, math.ceil(train_chars / LEARN_SAMPLE_CHARS))
    seen = 0
    for i, block in enumerate(blocks):
        if split_of[i] == "train":
            if seen % stride == 0:
                yield from block.text.splitlines()
            seen += 1


def _tokenized(tokenizer, blocks: Iterator[corpus_lib.Block], kind: str, eos_after: set[int]):
    """(block index, int32 ids, ends a document in its split) per piece of each block, in order.

    Tokenized inside tf.data (the graph path, identical to training and serving), several pieces at once.
    """
    def pieces():
        for i, block in enumerate(blocks):
            parts = [block.text] if kind == "sentencepiece" else _pieces(block.text, PIECE_CHARS)
            for k, part in enumerate(parts):
                yield i, part, i in eos_after and k == len(parts) - 1

    ds = tf.data.Dataset.from_generator(pieces, output_signature=(
        tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool)))
    ds = ds.map(lambda i, text, eos: (i, tf.cast(tokenizer.tokenize(text), tf.int32), eos),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
    for i, ids, eos in ds.as_numpy_iterator():
        yield int(i), ids, bool(eos)


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just after a line break that sits
    between two non-space characters: no tokenizer here (char, byte, WordPiece, GPT-2's BPE) joins
    tokens across one, so the pieces' tokens are the whole text's."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and not (0 < cut < len(text) - 1 and not text[cut - 1].isspace()
                                 and not text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        out.append(text[start:cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


def tokenize_blocks(tokenizer, blocks: Sequence[corpus_lib.Block], split: str,
                    progress: Progress) -> np.ndarray:
    """One int32 token stream; [EOS] closes each document's last block in the split."""
    if not blocks:
        return np.zeros([0], np.int32)
    # Tokenize inside tf.data: the graph path, identical to training and serving.
    ds = tf.data.Dataset.from_tensor_slices([b.text for b in blocks]).map(
        tokenizer.tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pieces, eos = [], np.array([tokenizer.eos_id], np.int32)
    for i, ids in enumerate(ds.as_numpy_iterator()):
        pieces.append(ids.astype(np.int32))
        if i + 1 == len(blocks) or blocks[i + 1].doc != blocks[i].doc:
            pieces.append(eos)
        progress.count(f"tokenizing {split}", i + 1, len(blocks), "blocks")
    return np.concatenate(pieces)


def _write_shards(scratch: str, dtype, count: int, out: fs.Path, split: str, config: PrepareConfig,
                  min_shards: int, progress: Progress) -> tuple[list[str], list[int]]:
    """Cuts the split's token stream (a scratch file of `count` ids) into contiguous shards of GZIP'd
    TFRecords of raw int32 records, reading a record at a time."""
    if count == 0:
        return [], []
    num = min(count, max(min_shards, math.ceil(count / config.shard_tokens)))
    bounds = np.linspace(0, count, num + 1).astype(np.int64)
    files, sizes = [], []
    options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=SHARD_GZIP_LEVEL)
    with open(scratch, "rb") as source:
        for i in range(num):
            name = f"{split}-{i:05d}-of-{num:05d}.tfrecord.gz"
            with tf.io.TFRecordWriter(str(out / name), options) as writer:
                for start in range(bounds[i], bounds[i + 1], config.record_tokens):
                    n = min(config.record_tokens, bounds[i + 1] - start)
                    writer.write(np.fromfile(source, dtype, count=n).astype("<i4").tobytes())
            files.append(name)
            sizes.append(int(bounds[i + 1] - bounds[i]))
            progress.count(f"writing {split} shards", i + 1, num)
    return files, sizes


def _remove_if_empty(path: fs.Path) -> None:
    """Removes a workdir this run created, unless something else appeared in it."""
    try:
        if any(not p.name.startswith(".") for p in path.iterdir()):
            return
        fs.rmtree(path)
    except (OSError, tf.errors.OpError):
        pass
