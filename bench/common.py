"""What several benchmarks share: an exported model of the bundled corpus."""

from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare.txt.gz"


def untrained_export(root: pathlib.Path, family: str, preset: str, export_base: str = "") -> tuple[pathlib.Path, pathlib.Path]:
    """Prepares the bundled corpus (char tokenizer) in ROOT/FAMILY, saves an untrained PRESET
    model as its checkpoint and exports it. Latency does not depend on the weights.

    Returns:
        (the workdir, the exported version directory).
    """
    import models
    from pipelines import checkpoints, prepare, tokenizers
    from serving.exporters import savedmodel

    workdir = root / family
    prepare.prepare(prepare.PrepareConfig(corpus=(str(CORPUS),), tokenizer=tokenizers.TokenizerConfig("char")),
                    workdir)
    vocab = json.loads((workdir / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    config = models.make_config(family, preset, vocab)
    checkpoints.save(workdir, models.build(config), config, step=1)
    return workdir, savedmodel.export(workdir, savedmodel.ExportConfig(export_base=export_base))
