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


# The longest test files first (seconds measured with `--durations=0`, 2026-12-08). `make test` runs
# pytest-xdist with `--dist loadfile --no-loadscope-reorder`, which hands whole files to the two
# workers in this order: the long files start at once and the short ones fill in at the end,
# instead of a long file starting last while the other worker idles.
LONGEST_FIRST = ("test_train.py", "test_tflite.py", "test_export.py", "test_serve.py", "test_pretrained.py",
                 "test_optimize.py", "test_serve_operations.py", "test_finetune.py", "test_pipeline.py",
                 "test_litertlm.py", "test_storage.py", "test_request_log.py", "test_hostile.py", "test_monitor.py",
                 "test_tokenizers.py", "test_openai_api.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order stays
