"""Labelled text for classifiers: CSV or JSONL files (plain, .gz or .bz2) -> (texts, labels).

    text,label                      {"text": "...", "label": "fresh"}
    "A dark, dull thriller.",rotten {"text": "...", "label": "rotten"}

The columns are named by the user (`--text_column`, `--label_column`); labels
are strings (a JSONL number or boolean label is read as its text), sorted to
give class ids, and saved with the classifier so that its outputs name them.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import json
import pathlib
from typing import Sequence

import numpy as np

from pipelines import fs
from pipelines.errors import ConfigError, UserError

FORMATS = (".csv", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Examples:
    """Texts with their string labels, in file order."""
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int], source: str) -> "Examples":
        return Examples(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices), source)


def _format(path: pathlib.Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of e.g. reviews.csv.bz2."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in (".gz", ".bz2") else ""
    kind = suffixes[-1] if suffixes else ""
    if kind not in FORMATS:
        raise UserError(f"{path}: expected a .csv or .jsonl file (optionally .gz or .bz2), "
                        f"not {''.join(path.suffixes) or 'a file without an extension'}")
    return kind, compression


def _read_text(path: pathlib.Path, compression: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = {"": lambda b: b, ".gz": gzip.decompress, ".bz2": bz2.decompress}[compression](raw)
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a valid {compression[1:]} file ({e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start}; convert it to UTF-8") from None


def _rows(path: pathlib.Path, kind: str, text: str):
    """Yields (line number, dict) per record, and the column names seen."""
    if kind == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise UserError(f"{path}: empty CSV file; expected a header line naming the columns")
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: not valid JSON ({e.msg}); JSONL has one object per line") \
                from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: expected a JSON object per line, got {type(row).__name__}")
        yield number, row


def _as_label(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def read(path: str | pathlib.Path, text_column: str, label_column: str) -> Examples:
    """Reads every example of a CSV or JSONL file.

    Raises:
        UserError: an unreadable file, a missing column (names the columns there are),
            an empty text or label.
    """
    path = fs.path(path)
    kind, compression = _format(path)
    content = _read_text(path, compression)
    texts, labels = [], []
    for number, row in _rows(path, kind, content):
        for column in (text_column, label_column):
            if column not in row:
                raise UserError(f"{path} line {number}: no column {column!r} (the file has "
                                f"{', '.join(map(repr, row))}); pass --text_column and --label_column")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path} line {number}: empty text in column {text_column!r}; "
                            "remove the example or fill in its text")
        if label is None or not _as_label(label).strip():
            raise UserError(f"{path} line {number}: empty label in column {label_column!r}; "
                            "remove the example or label it")
        texts.append(text.strip())
        labels.append(_as_label(label).strip())
    if not texts:
        raise UserError(f"{path} holds no examples")
    return Examples(tuple(texts), tuple(labels), str(path))


def label_set(examples: Examples) -> list[str]:
    """The sorted classes of the training examples.

    Raises:
        UserError: fewer than two classes.
    """
    classes = sorted(set(examples.labels))
    if len(classes) < 2:
        raise UserError(f"{examples.source}: every example is labelled {classes[0]!r}; "
                        "a classifier needs at least two classes")
    return classes


def split(examples: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random split into (train, validation), each class split in proportion.

    Raises:
        UserError: a fraction out of range, or too few examples to hold any out.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("val_fraction", val_fraction, "expected a fraction in (0, 1), such as 0.1")
    rng = np.random.default_rng(seed)
    labels = np.array(examples.labels)
    train_idx, val_idx = [], []
    for label in sorted(set(examples.labels)):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    if not val_idx or not train_idx:
        raise UserError(f"{examples.source}: {len(examples)} examples are too few to hold out "
                        f"--val_fraction={val_fraction}; add examples or pass --val=FILE")
    return (examples.take(sorted(int(i) for i in train_idx), f"{examples.source} (train split)"),
            examples.take(sorted(int(i) for i in val_idx), f"{examples.source} (validation split)"))
