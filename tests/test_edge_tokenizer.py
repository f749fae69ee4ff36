"""`serving.edge.tokenizer`: the device's tokenizer gives the training tokenizer's ids and text, without TensorFlow."""

import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

from pipelines import tokenizers
from pipelines.tokenizers import TokenizerConfig
from serving.edge.tokenizer import EdgeTokenizer
from tests.test_tokenizers import CHINESE, ids_of

# Text a device meets besides plays: accents, ligatures, CJK, emoji, controls, runs of white space.
ODD = [CHINESE, "na\u00efve  caf\u00e9 \U0001F600", "Stra\u00dfe \ufb01ne \u00c9T\u00c9", "tab\there\r\nand\x0bv",
       "zero\u200bwidth no\u00a0break", "'tis o'er--don't! 3.14, (x)", "  lead and trail  ", "\x00nul\x00", "",
       "a" * 120 + " long", "[EOS] literal", "\u00e9\u0301 combining"]


@pytest.mark.parametrize("kind, size, lowercase", [("char", 0, False), ("byte", 0, False), ("wordpiece", 300, False),
                                                   ("wordpiece", 300, True), ("sentencepiece", 200, False),
                                                   ("bpe", 400, False)])
def test_the_same_ids_and_text_as_the_training_tokenizer(tmp_path, english_text, kind, size, lowercase):
    out = tmp_path / kind
    out.mkdir()
    tokenizers.learn(TokenizerConfig(kind, size, lowercase), english_text.splitlines(), out)
    reference = tokenizers.load(out)
    device = EdgeTokenizer(tokenizers.load_config(out), {p.name: p.read_bytes() for p in out.iterdir()})
    assert (device.eos_id, device.pad_id) == (reference.eos_id, reference.pad_id)
    texts = english_text.splitlines()[:50] + [english_text[:3000]] + ODD
    # One batch through the graph, as tf.data and exported models run it. Reserved ids and half
    # a character decode too (the last row).
    ids = tf.function(lambda t: reference.tokenize(t))(tf.constant(texts)).to_list()
    ids.append([tokenizers.EOS_ID] + ids[0] + ids_of(reference, "caf\u00e9")[:-1] + [tokenizers.EOS_ID, 0])
    decoded = [t.decode("utf-8") for t in tf.function(lambda i: reference.detokenize(i))(
        tf.ragged.constant(ids, tf.int32)).numpy()]
    for text, row, back in zip(texts + [None], ids, decoded):
        if text is not None:
            assert device.encode(text) == row, text
        assert device.decode(row) == back, text


def test_the_device_runtime_imports_no_tensorflow():
    root = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys; import serving.edge, serving.edge.tokenizer, serving.edge.metadata; "
            "sys.exit(1 if 'tensorflow' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
