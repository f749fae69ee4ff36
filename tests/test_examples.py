"""The examples run as a user runs them: a subprocess, shrunk by its own flags."""

import math
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_article_example_trains_and_samples():
    vocab = 500
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "article_lstm.py"), "--max_words=4000", "--epochs=3", "--units=32",
         "--embedding_dim=16", f"--vocab_size={vocab}", "--seq_len=16", "--batch_size=16", "--words=12",
         "--prompt=to be or not"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^epoch \d+: loss ([\d.]+) nats/word$", result.stdout, re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0] and losses[-1] < math.log(vocab)  # below uniform
    sample = re.search(r"^sample: (.*)$", result.stdout, re.M).group(1).split()
    assert sample[:4] == ["to", "be", "or", "not"] and len(sample) == 4 + 12
