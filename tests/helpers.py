"""What tests share that is not a fixture: the bundled text, trained tiny workdirs and exports, the CLI.

Fixtures live in conftest.py and use these; tests import them from here.
"""

import gzip
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "shakespeare.txt.gz"


def bundled_lines(start: int, count: int) -> list[str]:
    """`count` lines of the bundled Shakespeare corpus, from line `start`."""
    with gzip.open(BUNDLED, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    return lines[start:start + count]


def trained_workdir(root: pathlib.Path, text: str, family: str) -> pathlib.Path:
    """A char-level workdir with a `tiny` model of `family` trained for 40 steps."""
    import json

    import models
    from pipelines import prepare, tokenizers, train

    (root / "corpus.txt").write_text(text, encoding="utf-8")
    prepare.prepare(prepare.PrepareConfig(corpus=(str(root / "corpus.txt"),),
                                          tokenizer=tokenizers.TokenizerConfig("char")), root / "run")
    vocab = json.loads((root / "run" / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    model_config = models.make_config(family, "tiny", vocab)
    train.train(root / "run", model_config, train.TrainConfig(steps=40, batch_size=8, warmup_steps=5, eval_every=0,
                                                              checkpoint_every=40), verbose=0)
    return root / "run"


_EXPORTS: dict = {}
# Few compiled shapes (each costs a compilation): batches of 3 round up to 4, of 5 run uncompiled.
TEST_BUCKETS = dict(batch_buckets=(1, 4), length_buckets=(16, 32))


def tiny_export(family: str, tmp_path_factory, text: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(workdir, WORKDIR/export/lm/1) of a trained tiny model, made once per test session.

    The first pytest-xdist worker to ask builds it in the session's shared temporary
    directory (the others wait on a file lock); each worker then works on its own copy.
    """
    if family not in _EXPORTS:
        import fcntl
        import os
        import shutil

        from serving.exporters import savedmodel

        session = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            session = session.parent  # pytest-N/, shared by this session's workers only
        shared = session / f"shared-export-{family}"
        with open(f"{shared}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shared / "built").exists():
                shutil.rmtree(shared, ignore_errors=True)
                shared.mkdir()
                savedmodel.export(trained_workdir(shared, text, family), savedmodel.ExportConfig(**TEST_BUCKETS))
                (shared / "built").touch()
        workdir = tmp_path_factory.mktemp(f"export-{family}") / "run"
        shutil.copytree(shared / "run", workdir)
        _EXPORTS[family] = (workdir, workdir / "export" / "lm" / "1")
    return _EXPORTS[family]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`lmstack ARGV...` in this process: (exit status, stdout, stderr)."""
    from app.main import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err
