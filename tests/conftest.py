"""Shared fixtures: tiny corpora made in tmp_path from the bundled text, served model bases.

Helpers that are not fixtures are in tests/helpers.py.
"""

import pathlib

import pytest

import app  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from tests.helpers import bundled_lines, tiny_export


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


@pytest.fixture(scope="module")
def served_bases(tmp_path_factory, english_text) -> pathlib.Path:
    """Model base paths (version 1) of a tiny transformer and a tiny LSTM: BASES/{transformer,lstm}/1."""
    import shutil

    root = tmp_path_factory.mktemp("bases")
    for family in ("transformer", "lstm"):
        _, exported = tiny_export(family, tmp_path_factory, english_text)
        shutil.copytree(exported, root / family / "1")
    return root

