"""Shared fixtures: tiny corpora made in tmp_path from the bundled text."""

import gzip
import pathlib

import pytest

import app  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "shakespeare.txt.gz"


def bundled_lines(start: int, count: int) -> list[str]:
    """`count` lines of the bundled Shakespeare corpus, from line `start`."""
    with gzip.open(BUNDLED, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    return lines[start:start + count]


@pytest.fixture(scope="session")
def english_text() -> str:
    # A few pages of Hamlet-era English: real text, small enough for seconds-long tests.
    return "".join(bundled_lines(2000, 400))


@pytest.fixture
def corpus_file(tmp_path, english_text) -> pathlib.Path:
    path = tmp_path / "corpus" / "plays.txt"
    path.parent.mkdir()
    path.write_text(english_text, encoding="utf-8")
    return path
