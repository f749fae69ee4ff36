"""Reading a text corpus: files, globs and .gz files of UTF-8 text.

A corpus is a list of documents, one per file, each a list of lines. The
train/validation split takes contiguous blocks of lines, never single random
characters or lines, so the validation text is text the model has not seen.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import os
import pathlib
from typing import Sequence

import numpy as np
import tensorflow as tf

from pipelines import fs
from pipelines.errors import ConfigError, UserError, check_choice

ENCODING_ERRORS = ("strict", "replace")


@dataclasses.dataclass(frozen=True)
class Document:
    """One input file, decoded.

    Attributes:
        path: the file it came from (absolute).
        sha256: hex digest of the file's bytes as stored (compressed for .gz).
        size: bytes on disk.
        text: the decoded text: BOM removed, CRLF and CR turned into LF.
    """
    path: str
    sha256: str
    size: int
    text: str


def resolve_paths(patterns: Sequence[str]) -> list[fs.Path]:
    """Expands files and globs, in the order given (each glob sorted); local or on a TensorFlow filesystem.

    Raises:
        UserError: a pattern matches nothing, or names a directory.
    """
    if not patterns:
        raise ConfigError("corpus", "", "no corpus given; name text files, globs or .gz files")
    paths: list[fs.Path] = []
    for pattern in patterns:
        where = fs.path(pattern)
        if glob.has_magic(pattern) and fs.is_local(where):
            matches = [pathlib.Path(p) for p in glob.glob(str(where), recursive=True) if os.path.isfile(p)]
        elif glob.has_magic(pattern):
            matches = [fs.GPath(p) for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)]
        if glob.has_magic(pattern):
            if not matches:
                raise ConfigError("corpus", pattern, "the pattern matches no file")
            paths.extend(sorted(matches))
        else:
            path = where
            if path.is_dir():
                raise ConfigError("corpus", path, f"is a directory; name its files or a glob such as {path}/*.txt")
            if not path.is_file():
                raise ConfigError("corpus", path, "no such file")
            paths.append(path)
    seen, unique = set(), []
    for p in paths:  # the same file twice would double-count it
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_document(path: fs.Path, encoding_errors: str = "strict") -> Document:
    """Reads and decodes one file (.gz is decompressed).

    Raises:
        UserError: the file is unreadable, or not UTF-8 with encoding_errors='strict'.
    """
    if encoding_errors not in ENCODING_ERRORS:
        check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    data = raw
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: not a valid gzip file ({e})") from None
    try:
        text = data.decode("utf-8-sig", errors=encoding_errors)
    except UnicodeDecodeError as e:
        where = "of the decompressed text" if path.suffix == ".gz" else ""
        raise UserError(
            f"{path}: not valid UTF-8 at byte {e.start} {where}".rstrip()
            + f" ({data[e.start:e.start + 4]!r}); convert it to UTF-8 or set encoding_errors=replace "
            "to turn bad bytes into U+FFFD") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return Document(path=str(path.resolve()), sha256=hashlib.sha256(raw).hexdigest(),
                    size=len(raw), text=text)


def read_corpus(patterns: Sequence[str], encoding_errors: str = "strict") -> list[Document]:
    """Reads every file of a corpus.

    Raises:
        UserError: a missing or undecodable file, or no text at all.
    """
    docs = [read_document(p, encoding_errors) for p in resolve_paths(patterns)]
    if not any(d.text.strip() for d in docs):
        names = ", ".join(pathlib.Path(d.path).name for d in docs[:5])
        raise UserError(f"the corpus is empty: {names} hold no text; pass files that contain text")
    return docs


@dataclasses.dataclass(frozen=True)
class Block:
    """A contiguous run of whole lines of one document."""
    doc: int
    text: str


def make_blocks(docs: Sequence[Document], num_blocks: int) -> list[Block]:
    """Cuts the corpus into about `num_blocks` blocks of whole lines.

    Blocks never cross a document boundary, so a document's end is always a
    block's end.
    """
    total = sum(len(d.text) for d in docs)
    target = max(1, total // max(1, num_blocks))
    blocks = []
    for i, doc in enumerate(docs):
        lines = doc.text.splitlines(keepends=True)
        start = size = 0
        for j, line in enumerate(lines):
            size += len(line)
            if size >= target:
                blocks.append(Block(i, "".join(lines[start:j + 1])))
                start, size = j + 1, 0
        if start < len(lines):
            blocks.append(Block(i, "".join(lines[start:])))
    return [b for b in blocks if b.text]


def split_blocks(blocks: Sequence[Block], val_fraction: float, seed: int) -> tuple[list[Block], list[Block], list[int]]:
    """Picks validation blocks with a seeded generator; both splits keep corpus order.

    Returns:
        (train blocks, validation blocks, indices of the validation blocks).
    Raises:
        UserError: val_fraction out of range, or too little text to hold any out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "expected a fraction in [0, 1), such as 0.1")
    if val_fraction == 0.0:
        return list(blocks), [], []
    num_val = max(1, round(val_fraction * len(blocks)))
    if num_val >= len(blocks):
        raise ConfigError("val_fraction", val_fraction, f"the corpus has too few lines ({len(blocks)} blocks) "
                          "to hold this out for validation; add text or lower it")
    rng = np.random.default_rng(seed)
    val_idx = sorted(int(i) for i in rng.choice(len(blocks), size=num_val, replace=False))
    val_set = set(val_idx)
    train = [b for i, b in enumerate(blocks) if i not in val_set]
    val = [blocks[i] for i in val_idx]
    return train, val, val_idx
