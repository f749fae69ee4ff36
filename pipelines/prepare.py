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

import concurrent.futures
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
from pipelines import shards
from pipelines import tokenizers
from pipelines import workdir as workdir_lib
from pipelines.errors import ConfigError, UserError, check_at_least, check_choice
from pipelines.progress import Progress

MANIFEST_FORMAT = 1
# Tokenizers other than char learn from at most this much training text: a sample of whole blocks
# spread over the corpus when it holds more (their trainers keep their text in memory).
LEARN_SAMPLE_CHARS = 50_000_000


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

    def shard_bounds(self, count: int, split: str) -> np.ndarray:
        """Where the shards of a split of `count` tokens start (and the last ends): `shards.bounds`."""
        min_shards = self.min_train_shards if split == "train" else self.min_val_shards
        return shards.bounds(count, self.shard_tokens, min_shards)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What `prepare` did: `reused` is True when the workdir was already up to date."""
    workdir: workdir_lib.Workdir
    manifest: dict[str, Any]
    reused: bool


def prepare(config: PrepareConfig, workdir: str | os.PathLike, overwrite: bool = False,
            progress: Progress | None = None, runner: str = "", beam_options: Sequence[str] = ()) -> PrepareResult:
    """Builds (or reuses) the tokenizer and token shards of a workdir.

    Args:
        config: what to read and how to tokenize it.
        workdir: the run directory; created if missing.
        overwrite: replace a workdir prepared from other inputs (and every later
            stage's outputs in it, which were built from the old data).
        progress: where progress goes; silent by default.
        runner: tokenize and write the shards as an Apache Beam pipeline on this runner (same shards).
        beam_options: the runner's pipeline options.
    Returns:
        The manifest and whether the existing workdir was reused.
    Raises:
        UserError: bad input; the workdir is left as it was.
    """
    progress = progress or Progress()
    config.validate()
    wd = workdir_lib.Workdir(workdir)
    if runner:
        try:
            from pipelines import beam_prepare
        except ImportError:
            raise ConfigError("runner", runner, "needs Apache Beam: pip install 'lmstack[beam]'") from None
        beam_prepare.check(runner, beam_options, wd.root, corpus_lib.resolve_paths(config.corpus))
    paths, sources = corpus_lib.scan_corpus(config.corpus, config.encoding_errors)
    progress.note(f"read {len(sources)} file(s), {sum(s.size for s in sources) / 1e6:.1f} MB")
    fingerprint = _fingerprint(config, sources)

    if wd.is_imported():
        return _prepare_imported(config, wd, paths, sources, fingerprint, overwrite, progress, runner, beam_options)
    if wd.root.exists():
        _check_existing(wd, fingerprint, overwrite)
        if wd.is_prepared() and not overwrite:
            progress.note(f"{wd.root} is already prepared from these inputs; reusing it")
            return PrepareResult(wd, wd.read_manifest(), reused=True)
    created = workdir_lib.ensure_writable_dir(wd.root)
    try:
        with workdir_lib.publish_dir(wd.tokenizer_dir, replace=True) as tok_dir, \
                workdir_lib.publish_dir(wd.data_dir, replace=True) as data_dir:
            manifest = _build(config, paths, sources, fingerprint, tok_dir, data_dir, progress, runner=runner,
                              beam_options=beam_options)
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
                      fingerprint: str, overwrite: bool, progress: Progress, runner: str = "",
                      beam_options: Sequence[str] = ()) -> PrepareResult:
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
        manifest = _build(config, paths, sources, fingerprint, wd.tokenizer_dir, data_dir, progress, learn=False,
                          runner=runner, beam_options=beam_options)
    wd.update_config("prepare", config.to_json() | {"fingerprint": fingerprint})
    return PrepareResult(wd, manifest, reused=False)


def summary(manifest: dict[str, Any]) -> str:
    """A short human summary of a manifest: documents, characters, tokens, vocabulary, shards."""
    tok = manifest["tokenizer"]
    rows = [("split", "documents", "characters", "tokens", "chars/token", "shards")]
    for name in shards.SPLITS:
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the passes before tokenizing decide: the blocks (by index, in corpus order) and their splits.

    Attributes:
        target: characters a block reaches before it ends (at the end of that line).
        sizes: characters of each block.
        doc_of: the document (input file) of each block.
        split_of: "train" or "val" for each block.
        val_blocks: indices of the validation blocks.
        eos_after: blocks that close their document within their split ([EOS] follows them).
    """
    target: int
    sizes: list[int]
    doc_of: list[int]
    split_of: list[str]
    val_blocks: list[int]
    eos_after: frozenset[int]


def plan(config: PrepareConfig, paths: Sequence[fs.Path], sources: Sequence[corpus_lib.Source]) -> Plan:
    """Reads the corpus once more (streamed) for its blocks' sizes; draws the validation blocks."""
    target = corpus_lib.block_target(sum(s.chars for s in sources), config.num_blocks)
    sizes, doc_of = [], []
    for block in corpus_lib.iter_blocks(paths, target, config.encoding_errors):
        sizes.append(len(block.text))
        doc_of.append(block.doc)
    val_blocks = corpus_lib.validation_blocks(len(sizes), config.val_fraction, config.seed)
    split_of = ["train"] * len(sizes)
    for i in val_blocks:
        split_of[i] = "val"
    last = {(doc, split): i for i, (doc, split) in enumerate(zip(doc_of, split_of))}
    return Plan(target, sizes, doc_of, split_of, val_blocks, frozenset(last.values()))


def _build(config: PrepareConfig, paths: Sequence[fs.Path], sources: Sequence[corpus_lib.Source], fingerprint: str,
           tok_dir: fs.Path, data_dir: fs.Path, progress: Progress, learn: bool = True,
           runner: str = "", beam_options: Sequence[str] = ()) -> dict[str, Any]:
    """Tokenizer and shards from a corpus streamed a block at a time: memory does not grow with the corpus.

    The files are read three times (blocks' sizes, learning, tokenizing). Tokenizing and writing the
    shards run here (`_write_local`) or as an Apache Beam pipeline on `runner` (`beam_prepare`),
    which writes the same shards.
    """
    blocks = plan(config, paths, sources)
    if learn:
        progress.note(f"learning the {config.tokenizer.kind} tokenizer on the training text")
        lines = _learning_lines(corpus_lib.iter_blocks(paths, blocks.target, config.encoding_errors),
                                blocks.split_of, blocks.sizes, config.tokenizer.kind)
        tokenizers.learn(config.tokenizer, lines, tok_dir)
    if runner:
        from pipelines import beam_prepare

        written = beam_prepare.tokenize_and_write(config, paths, blocks, tok_dir, data_dir, runner, beam_options,
                                                  progress)
    else:
        written = _write_local(config, paths, blocks, tokenizers.load(tok_dir), data_dir, progress)
    splits = {}
    for name in shards.SPLITS:
        members = [i for i, split in enumerate(blocks.split_of) if split == name]
        names, shard_sizes = written[name]
        splits[name] = {
            "files": names, "shard_tokens": shard_sizes, "tokens": sum(shard_sizes),
            "chars": sum(blocks.sizes[i] for i in members),
            "documents": len({blocks.doc_of[i] for i in members}), "blocks": len(members),
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fingerprint,
        "sources": [{"path": s.path, "sha256": s.sha256, "bytes": s.size} for s in sources],
        "tokenizer": tokenizers.load_config(tok_dir),
        "split": {"val_fraction": config.val_fraction, "seed": config.seed,
                  "blocks": len(blocks.sizes), "val_blocks": blocks.val_blocks},
        "record_tokens": config.record_tokens,
        "splits": splits,
    }
    workdir_lib.write_json(data_dir / workdir_lib.MANIFEST_FILE, manifest)
    return manifest


def _write_local(config: PrepareConfig, paths: Sequence[fs.Path], blocks: Plan, tokenizer, data_dir: fs.Path,
                 progress: Progress) -> dict[str, tuple[list[str], list[int]]]:
    """Tokenizes in this process; ids wait in a local scratch file (2 or 4 bytes a token) until each
    split's count fixes the shard bounds. Returns split -> (shard files, tokens per shard)."""
    dtype = np.uint16 if tokenizer.vocabulary_size() <= 1 << 16 else np.int32
    stream = corpus_lib.iter_blocks(paths, blocks.target, config.encoding_errors)
    with tempfile.TemporaryDirectory(prefix="lmstack-prepare-") as scratch:
        files = {name: open(os.path.join(scratch, name), "wb") for name in shards.SPLITS}
        counts = dict.fromkeys(shards.SPLITS, 0)
        try:
            for i, ids, eos in _tokenized(tokenizer, stream, config.tokenizer.kind, blocks.eos_after):
                if eos:
                    ids = np.append(ids, tokenizer.eos_id)
                ids.astype(dtype).tofile(files[blocks.split_of[i]])
                counts[blocks.split_of[i]] += ids.size
                progress.count("tokenizing the corpus", i + 1, len(blocks.sizes), "blocks")
        finally:
            for f in files.values():
                f.close()
        return {name: _write_shards(os.path.join(scratch, name), dtype, config.shard_bounds(counts[name], name),
                                    data_dir, name, config, progress) for name in shards.SPLITS}


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
            parts = [block.text] if kind == "sentencepiece" else shards.text_pieces(block.text, shards.PIECE_CHARS)
            for k, part in enumerate(parts):
                yield i, part, i in eos_after and k == len(parts) - 1

    ds = tf.data.Dataset.from_generator(pieces, output_signature=(
        tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool)))
    ds = ds.map(lambda i, text, eos: (i, tf.cast(tokenizer.tokenize(text), tf.int32), eos),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
    for i, ids, eos in ds.as_numpy_iterator():
        yield int(i), ids, bool(eos)


def _write_shards(scratch: str, dtype, bounds: np.ndarray, out: fs.Path, split: str, config: PrepareConfig,
                  progress: Progress) -> tuple[list[str], list[int]]:
    """Cuts the split's token stream (a scratch file) into contiguous shards at `bounds`, one shard
    per thread on every core (TensorFlow's record writer compresses without holding the GIL: 2 threads
    write 2x as fast here); each thread holds one shard's tokens."""
    num = len(bounds) - 1
    names = [shards.shard_name(split, i, num) for i in range(num)]
    itemsize = np.dtype(dtype).itemsize

    def write(i: int) -> None:
        tokens = np.fromfile(scratch, dtype, count=int(bounds[i + 1] - bounds[i]), offset=int(bounds[i]) * itemsize)
        shards.write_shard(out / names[i], tokens, config.record_tokens)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="shard-writer") as pool:
        for done, future in enumerate(concurrent.futures.as_completed([pool.submit(write, i) for i in range(num)])):
            future.result()
            progress.count(f"writing {split} shards", done + 1, num)
    return names, [int(n) for n in np.diff(bounds)]


def _remove_if_empty(path: fs.Path) -> None:
    """Removes a workdir this run created, unless something else appeared in it."""
    try:
        if any(not p.name.startswith(".") for p in path.iterdir()):
            return
        fs.rmtree(path)
    except (OSError, tf.errors.OpError):
        pass
