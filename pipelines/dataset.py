"""tf.data input from a prepared workdir: `(inputs, targets)` windows of token ids.

Each shard is a contiguous piece of the token stream. A shard's records are
re-cut into windows of `seq_len + 1` tokens (`rebatch`, no per-token
elements), each window becomes `inputs = w[:-1]`, `targets = w[1:]`, and the
shards are interleaved in parallel. Windows never straddle two shards.

Sharding across workers is by file: with an `input_context` (from
`strategy.distribute_datasets_from_function`) each input pipeline reads every
N-th shard; without one, `experimental_distribute_dataset`'s FILE auto-shard
policy finds the file list itself. prepare writes at least 8 training shards.
"""

from __future__ import annotations

import os

import tensorflow as tf

from pipelines import workdir as workdir_lib
from pipelines.errors import UserError


def shard_files(workdir: str | os.PathLike, split: str) -> list[str]:
    """The shard paths of one split ('train' or 'val'), in stream order."""
    wd = workdir_lib.Workdir(workdir)
    manifest = wd.read_manifest()
    files = manifest["splits"][split]["files"]
    if not files:
        raise UserError(f"{wd.root} has no {split} data; prepare it with a larger corpus"
                        + (" or --val_fraction > 0" if split == "val" else ""))
    return [str(wd.data_dir / f) for f in files]


def _file_windows(path: tf.Tensor, seq_len: int) -> tf.data.Dataset:
    records = tf.data.TFRecordDataset(path, compression_type="GZIP")
    tokens = records.map(lambda r: tf.io.decode_raw(r, tf.int32))  # [record_tokens]
    return tokens.rebatch(seq_len + 1, drop_remainder=True)  # [seq_len + 1]


def _split_window(windows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def _windows(files: list[str], seq_len: int, input_context, shuffle_files: bool,
             seed: int | None) -> tf.data.Dataset:
    if seq_len < 1:
        raise UserError(f"seq_len={seq_len}: must be at least 1")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(files) < input_context.num_input_pipelines:
            raise UserError(
                f"{len(files)} shards cannot feed {input_context.num_input_pipelines} input pipelines; "
                "prepare with more shards (a larger corpus or smaller shards)")
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed)
    return ds.interleave(
        lambda f: _file_windows(f, seq_len), cycle_length=min(8, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_dataset(workdir: str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0,
                  shuffle_buffer: int = 10_000, repeat: bool = True,
                  input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """The training input: shuffled `(inputs, targets)` int32 `[batch_size, seq_len]` batches.

    Args:
        workdir: a prepared workdir.
        seq_len: tokens per example.
        batch_size: examples per batch (per input pipeline when sharded; use
            `input_context.get_per_replica_batch_size` for a global batch).
        seed: the same seed gives the same batches in the same order.
        shuffle_buffer: windows held for shuffling.
        repeat: repeat forever (epochs reshuffle).
        input_context: shards the files across input pipelines (workers).
    Returns:
        A dataset of `(inputs, targets)` where `targets[:, t] == inputs[:, t + 1]`
        within a window, batched with `drop_remainder=True` and prefetched.
    """
    ds = _windows(shard_files(workdir, "train"), seq_len, input_context, True, seed)
    ds = ds.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(_split_window, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def val_dataset(workdir: str | os.PathLike, seq_len: int, batch_size: int, drop_remainder: bool = True,
                input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """The validation input: every validation window once, always in the same order."""
    ds = _windows(shard_files(workdir, "val"), seq_len, input_context, False, None)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(_split_window, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
