"""Transfer learning: what pre-training buys a classifier of the bundled movie-review snippets.

Starts from the language models bench/quality.py trains (runs/bench-quality/
{transformer,lstm}: `small`, char-level, 1,500 steps on the bundled Shakespeare)
and fine-tunes each into a fresh / rotten classifier of data/reviews.csv.bz2
(4,866 snippets; 10 % held out per class, the same split for every run)
through the real `lmstack finetune` code path:

    fine-tuned     pre-trained backbone, everything trained (--freeze=none)
    head only      pre-trained backbone frozen, only pooling + Dense head trained (--freeze=all)
    from scratch   the same network with random weights, everything trained (the baseline)

With --in_domain, one more backbone: a `small` char-level transformer
pre-trained by `lmstack train` on the *training* split's review texts alone,
labels ignored (the validation texts are never seen: the split is the same
seeded one) — ULMFiT's recipe of a language model of the target domain.

Every run has the same steps, batch and pooling. Accuracy is on the held-out
split; "majority" is the accuracy of always answering the larger class.

Prints a table and writes bench/results/finetune.json.

usage: python bench/finetune.py [--models=transformer,lstm] [--steps=400] [--in_domain] [--rerun]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: F401  (environment before TensorFlow)
import tensorflow as tf

from pipelines import finetune
from pipelines.progress import Progress

RESULTS = ROOT / "bench" / "results"
REVIEWS = ROOT / "data" / "reviews.csv.bz2"


def _same_settings(saved: dict, config: finetune.FinetuneConfig) -> bool:
    """Whether a classifier workdir's saved settings are `config`'s (paths compared resolved)."""
    for key, value in dataclasses.asdict(config).items():
        if key == "overwrite":
            continue
        old = saved.get(key)
        if key in ("base", "train") and old and value:
            old, value = pathlib.Path(old).resolve(), pathlib.Path(value).resolve()
        if old != value:
            return False
    return True


def run(base: pathlib.Path, out: pathlib.Path, rerun: bool, progress: Progress, **settings) -> dict:
    """Fine-tunes into `out`, or reuses its result when it was trained with the same settings
    from the base as it is now."""
    config = finetune.FinetuneConfig(base=str(base), train=str(REVIEWS), overwrite=True, **settings)
    if (out / "metrics.json").is_file() and (out / "config.json").is_file() and not rerun:
        saved = json.loads((out / "config.json").read_text()).get(finetune.FINETUNE_SECTION, {})
        base_trained = max((p.stat().st_mtime for p in (base / "checkpoints").iterdir()), default=0.0)
        if not _same_settings(saved, config):
            progress.note(f"{out} was trained with other settings: training it again")
        elif base_trained > (out / "metrics.json").stat().st_mtime:
            progress.note(f"{base} was retrained after {out}: training it again")
        else:
            return json.loads((out / "metrics.json").read_text())
    return finetune.finetune(out, config, progress=progress, verbose=2)


def in_domain_base(root: pathlib.Path, steps: int, progress: Progress) -> pathlib.Path:
    """A `small` transformer language model of the training split's review texts (labels unused)."""
    import models
    from pipelines import labelled, prepare, tokenizers, train

    workdir = root / "reviews-lm"
    if (workdir / "metrics.json").is_file():
        return workdir
    train_split, _ = labelled.split(labelled.read(REVIEWS, "text", "label"), 0.1, 0)  # finetune's split
    corpus = root / "reviews-train-texts.txt"
    root.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(train_split.texts) + "\n", encoding="utf-8")
    prepare.prepare(prepare.PrepareConfig(corpus=(str(corpus),), tokenizer=tokenizers.TokenizerConfig("char"),
                                          val_fraction=0.05), workdir, overwrite=True, progress=progress)
    vocab = json.loads((workdir / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    train.train(workdir, models.make_config("transformer", "small", vocab),
                train.TrainConfig(steps=steps, batch_size=32, warmup_steps=100, eval_every=0,
                                  checkpoint_every=steps), progress, verbose=2)
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,lstm")
    parser.add_argument("--bases", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-finetune"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--in_domain", action="store_true", help="also a transformer pre-trained on the review texts")
    parser.add_argument("--in_domain_steps", type=int, default=1000)
    parser.add_argument("--rerun", action="store_true", help="retrain classifiers that exist")
    args = parser.parse_args()
    progress = Progress(sys.stderr)
    common = dict(steps=args.steps, pooling=args.pooling, batch_size=32, eval_every=args.steps // 4,
                  val_fraction=0.1, seed=0)
    results = {"benchmark": "finetune", "machine": {"node": platform.node(),
                                                   "cpus": len(tf.config.list_logical_devices("CPU"))},
               "tensorflow": tf.__version__, "data": str(REVIEWS.relative_to(ROOT)), "settings": common,
               "models": {}}
    rows = []
    for family in args.models.split(","):
        base = pathlib.Path(args.bases) / family
        if not (base / "checkpoints").is_dir():
            sys.exit(f"{base} has no trained model: run `python bench/quality.py --models={family}` first")
        out = pathlib.Path(args.out) / family
        tuned = run(base, out / "fine-tuned", args.rerun, progress, freeze="none", learning_rate=1e-3,
                    baseline=True, **common)
        head = run(base, out / "head-only", args.rerun, progress, freeze="all", learning_rate=3e-3, **common)
        scratch = json.loads((out / "fine-tuned" / finetune.BASELINE_DIR / "metrics.json").read_text())
        runs = [("fine-tuned", tuned), ("head only", head), ("from scratch", scratch)]
        if args.in_domain and family == "transformer":
            lm = in_domain_base(pathlib.Path(args.out), args.in_domain_steps, progress)
            runs.insert(1, ("fine-tuned, LM of the review texts", run(
                lm, out / "in-domain", args.rerun, progress, freeze="none", learning_rate=1e-3, **common)))
        entry = {}
        for name, m in runs:
            entry[name] = {k: m[k] for k in ("accuracy", "macro_f1", "trainable_params", "params", "wall_seconds",
                                             "examples_per_s", "train_accuracy", "majority_class_accuracy")}
            rows.append((family, name, m))
        results["models"][family] = entry

    print(f"\n## fresh / rotten review snippets: {args.steps} steps of 32, pooling {args.pooling}\n")
    print("| backbone | training | accuracy | macro F1 | train acc. | trainable params | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for family, name, m in rows:
        print(f"| {family} | {name} | {m['accuracy']:.1%} | {m['macro_f1']:.3f} | {m['train_accuracy']:.1%} | "
              f"{m['trainable_params']:,} | {m['wall_seconds']:.0f} |")
    first = rows[0][2]
    print(f"\nmajority class: {first['majority_class_accuracy']:.1%} of {first['examples']} held-out examples")
    for family, entry in results["models"].items():
        gain = entry["fine-tuned"]["accuracy"] - entry["from scratch"]["accuracy"]
        print(f"- {family}: pre-training {gain:+.1%} accuracy over the same network from scratch")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'finetune.json'}")


if __name__ == "__main__":
    main()
