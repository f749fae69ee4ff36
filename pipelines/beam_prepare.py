"""`lmstack prepare --runner=...`: tokenizing and shard writing as an Apache Beam pipeline.

The driver (the `lmstack prepare` process) scans the corpus, plans the blocks
and their split and learns the tokenizer exactly as the local prepare does
(`prepare.plan`, in the driver); the pipeline then does the heavy part on the runner's
workers, and writes the same shards:

    files -> blocks (read where they run) -> tokenize (+ [EOS]) -> token counts (a side input)
          -> each block's tokens cut at the split's shard bounds -> group by shard -> write TFRecords

Shard bounds depend on each split's token count, so the pieces of a shard
meet in a GroupByKey and are put back in stream order by their offsets.
`--runner=DirectRunner` runs it in this process; DataflowRunner, FlinkRunner
and SparkRunner take their own options (`--beam_options`) and need a
workdir their workers reach (gs://...). Workers need lmstack installed
(`--beam_options="--setup_file=./setup.py"` or a container image).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners import create_runner

from pipelines import corpus as corpus_lib
from pipelines import fs
from pipelines import shards
from pipelines.errors import ConfigError
from pipelines.progress import Progress

RESULT_FILE = ".beam-shards.json"  # the pipeline's answer to the driver: shard names and sizes


def check(runner: str, options: Sequence[str], workdir: fs.Path, paths: Sequence[fs.Path]) -> None:
    """Fails before any work on what Beam would refuse or ignore: a runner it does not have, options
    it does not know (it would only log and drop them), a remote runner with local files.

    Raises:
        ConfigError: the settings above.
    """
    try:
        create_runner(runner)
    except ValueError as e:
        raise ConfigError("runner", runner, f"{str(e).split('. Valid')[0]}; use DirectRunner, DataflowRunner, "
                          "FlinkRunner or SparkRunner") from None
    dropped: list[str] = []

    class Dropped(logging.Handler):
        def emit(self, record):
            if "unparseable" in record.getMessage():
                dropped.append(record.getMessage())

    log = logging.getLogger("apache_beam.options.pipeline_options")
    handler = Dropped()
    log.addHandler(handler)
    try:
        PipelineOptions([f"--runner={runner}", *options]).get_all_options()
    except SystemExit:  # argparse on a known option with a bad value
        dropped.append("a bad value")
    finally:
        log.removeHandler(handler)
    if dropped:
        raise ConfigError("beam_options", " ".join(options), f"Beam does not take {dropped[0].split(': ', 1)[-1]}")
    if runner not in ("DirectRunner", "PrismRunner") and (fs.is_local(workdir) or any(fs.is_local(p) for p in paths)):
        raise ConfigError("runner", runner, "runs on other machines: give a --workdir and --corpus they reach "
                          "(gs://...), or use DirectRunner")


def tokenize_and_write(config, paths: Sequence[fs.Path], plan, tok_dir: fs.Path, data_dir: fs.Path, runner: str,
                       options: Sequence[str], progress: Progress) -> dict[str, tuple[list[str], list[int]]]:
    """Runs the pipeline; returns split -> (shard files, tokens per shard), as `prepare._write_local`.

    (`check` first.)
    """
    blocks_per_file = np.bincount(plan.doc_of, minlength=len(paths))
    first = np.concatenate([[0], np.cumsum(blocks_per_file)[:-1]])  # each file's first block index
    progress.note(f"tokenizing and writing shards with Apache Beam ({runner}, {len(plan.sizes)} blocks)")
    settings = {"target": plan.target, "errors": config.encoding_errors, "kind": config.tokenizer.kind,
                "split_of": plan.split_of, "eos_after": sorted(plan.eos_after), "record_tokens": config.record_tokens,
                "tokenizer": str(tok_dir), "data": str(data_dir), "config": config, "piece": shards.PIECE_CHARS}
    with beam.Pipeline(options=PipelineOptions([f"--runner={runner}", *options])) as p:
        tokens = (p
                  | "files" >> beam.Create([(str(path), int(start)) for path, start in zip(paths, first)])
                  | "blocks" >> beam.FlatMap(_blocks, settings["target"], settings["errors"])
                  | "spread" >> beam.Reshuffle()
                  | "tokenize" >> beam.ParDo(_Tokenize(settings)))
        layout = (tokens
                  | "count" >> beam.Map(lambda t: (t[0], t[1].size))
                  | "counts" >> beam.combiners.ToList()
                  | "layout" >> beam.Map(_layout, settings))
        _ = (tokens
             | "cut" >> beam.FlatMap(_cut_at_shards, beam.pvalue.AsSingleton(layout))
             | "by shard" >> beam.GroupByKey()
             | "write" >> beam.Map(_write, settings)
             | "all" >> beam.combiners.ToList()
             | "answer" >> beam.Map(_answer, settings["data"]))
    answer = fs.path(data_dir) / RESULT_FILE
    written = json.loads(answer.read_text())
    answer.unlink()
    out = {}
    for split in shards.SPLITS:
        mine = sorted((s for s in written if s["split"] == split), key=lambda s: s["index"])
        out[split] = ([s["name"] for s in mine], [s["tokens"] for s in mine])
    return out


def _blocks(file: tuple[str, int], target: int, errors: str) -> Iterator[tuple[int, str]]:
    """(global block index, text) of one file's blocks; `file` is (path, its first block's index)."""
    path, first = file
    for k, block in enumerate(corpus_lib.iter_blocks([fs.path(path)], target, errors)):
        yield first + k, block.text


class _Tokenize(beam.DoFn):
    """Loads the tokenizer once per worker; (block index, text) -> (block index, int32 ids incl. [EOS])."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def setup(self):
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # as lmstack's processes (app/__init__.py)
        import tensorflow as tf

        from pipelines import tokenizers

        self.tokenizer = tokenizers.load(self.settings["tokenizer"])
        self.tokenize = tf.function(lambda text: tf.cast(self.tokenizer.tokenize(text), tf.int32),
                                    input_signature=[tf.TensorSpec([], tf.string)])  # one trace for every text
        self.eos_after = set(self.settings["eos_after"])

    def process(self, block):
        index, text = block
        parts = [text] if self.settings["kind"] == "sentencepiece" else shards.text_pieces(text, self.settings["piece"])
        ids = [self.tokenize(part).numpy() for part in parts]
        if index in self.eos_after:
            ids.append(np.array([self.tokenizer.eos_id], np.int32))
        yield index, np.concatenate(ids).astype(np.int32)


def _layout(counts: list[tuple[int, int]], settings: dict[str, Any]) -> dict[str, Any]:
    """From every block's token count: where its tokens start in its split's stream, and each
    split's shard bounds (as the local prepare cuts them)."""
    split_of = settings["split_of"]
    offsets, totals = {}, dict.fromkeys(shards.SPLITS, 0)
    for index, count in sorted(counts):
        offsets[index] = totals[split_of[index]]
        totals[split_of[index]] += count
    return {"split_of": split_of, "offsets": offsets,
            "bounds": {split: settings["config"].shard_bounds(totals[split], split) for split in totals}}


def _cut_at_shards(block: tuple[int, np.ndarray], layout: dict[str, Any]
                   ) -> Iterator[tuple[tuple[str, int, int], tuple[int, np.ndarray]]]:
    """A block's tokens cut at its split's shard bounds: ((split, shard, shards), (offset in shard, tokens))."""
    index, ids = block
    split, offset = layout["split_of"][index], layout["offsets"][index]
    bounds = layout["bounds"][split]
    num = len(bounds) - 1
    for shard in range(num):
        start, end = max(offset, bounds[shard]), min(offset + ids.size, bounds[shard + 1])
        if start < end:
            yield (split, shard, num), (int(start - bounds[shard]), ids[start - offset:end - offset])


def _write(shard: tuple[tuple[str, int, int], Iterable[tuple[int, np.ndarray]]], settings: dict[str, Any]) -> dict:
    """Puts a shard's pieces (GroupByKey's iterable, in no order) back in stream order and writes it."""
    (split, index, num), pieces = shard
    tokens = np.concatenate([ids for _, ids in sorted(pieces, key=lambda piece: piece[0])])
    name = shards.shard_name(split, index, num)
    shards.write_shard(fs.path(settings["data"]) / name, tokens, settings["record_tokens"])
    return {"split": split, "index": index, "name": name, "tokens": int(tokens.size)}


def _answer(shards: list[dict], data: str) -> None:
    (fs.path(data) / RESULT_FILE).write_text(json.dumps(shards))
