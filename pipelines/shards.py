"""The token shards' layout and files, shared by the local prepare and its Apache Beam pipeline.

A split's token stream is cut into contiguous shards of about even size (`bounds`), each a GZIP'd
TFRecord file of raw little-endian int32 records (`write_shard`), named `SPLIT-00000-of-00008.tfrecord.gz`.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pipelines import fs

SPLITS = ("train", "val")
# Blocks are tokenized in pieces of about this many characters (`text_pieces`).
PIECE_CHARS = 1 << 20
# zlib level of the shards: 3 writes int32 token records ~3x faster than the default 6, files ~17 % larger.
SHARD_GZIP_LEVEL = 3


def bounds(count: int, shard_tokens: int, min_shards: int) -> np.ndarray:
    """Token offsets where a split of `count` tokens' shards start (and the last ends): contiguous, even,
    at most `shard_tokens` a shard and at least `min_shards` shards (fewer only if there are fewer tokens)."""
    num = min(count, max(min_shards, math.ceil(count / shard_tokens)))
    return np.linspace(0, count, num + 1).astype(np.int64)


def text_pieces(text: str, size: int) -> list[str]:
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


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord.gz"


def write_shard(path: fs.Path, tokens: np.ndarray, record_tokens: int) -> None:
    """One shard: GZIP'd TFRecords of raw little-endian int32 records of `record_tokens` tokens."""
    options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=SHARD_GZIP_LEVEL)
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for start in range(0, tokens.size, record_tokens):
            writer.write(tokens[start:start + record_tokens].astype("<i4").tobytes())
