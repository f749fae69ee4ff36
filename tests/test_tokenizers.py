import json
import subprocess
import sys

import pytest
import tensorflow as tf

from pipelines import tokenizers
from pipelines.errors import UserError
from pipelines.tokenizers import TokenizerConfig

CHINESE = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n"


def learned(tmp_path, kind, lines, vocab_size=0):
    out = tmp_path / kind
    out.mkdir()
    tokenizers.learn(TokenizerConfig(kind, vocab_size), lines, out)
    return tokenizers.load(out)


def ids_of(tok, text):
    # Always through a graph, as tf.data and exported models run it.
    return tf.function(lambda t: tok.tokenize(t))(tf.constant(text)).numpy().tolist()


def text_of(tok, ids):
    return tf.function(lambda i: tok.detokenize(i))(tf.constant(ids, tf.int32)).numpy().decode("utf-8")


@pytest.mark.parametrize("kind, size", [("char", 0), ("byte", 0), ("wordpiece", 300), ("sentencepiece", 200),
                                        ("bpe", 400)])
def test_reserved_tokens_share_ids(tmp_path, english_text, kind, size):
    tok = learned(tmp_path, kind, english_text.splitlines(), size)
    vocab = tok.get_vocabulary()
    assert vocab[:4] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    assert tok.vocabulary_size() == len(vocab)
    config = json.loads((tmp_path / kind / "tokenizer.json").read_text())
    assert config["vocab_size"] == len(vocab) and config["kind"] == kind
    assert (tok.eos_id, tok.pad_id) == (tokenizers.EOS_ID, tokenizers.PAD_ID)


def test_char_round_trip_and_unknown_characters(tmp_path, english_text):
    tok = learned(tmp_path, "char", english_text.splitlines())
    sample = english_text[:500]
    ids = ids_of(tok, sample)
    assert len(ids) == len(sample) and min(ids) >= 4
    assert text_of(tok, ids) == sample
    assert ids_of(tok, "\u2603")[0] == tokenizers.UNK_ID
    assert text_of(tok, [tokenizers.BOS_ID] + ids_of(tok, "to be") + [tokenizers.EOS_ID, 0, 0]) == "to be"


def test_char_vocabulary_is_capped_by_frequency(tmp_path):
    tok = learned(tmp_path, "char", ["aaaa bbb cc d"], vocab_size=6)
    assert tok.get_vocabulary()[4:] == ["a", " "]
    assert ids_of(tok, "ad") == [4, tokenizers.UNK_ID]


def test_chinese_with_the_char_tokenizer(tmp_path):
    tok = learned(tmp_path, "char", CHINESE.splitlines())
    ids = ids_of(tok, CHINESE)
    assert len(ids) == len(CHINESE) and tokenizers.UNK_ID not in ids
    assert text_of(tok, ids) == CHINESE


def test_byte_round_trips_any_utf8_exactly(tmp_path):
    tok = learned(tmp_path, "byte", [])
    text = CHINESE + "na\u00efve caf\u00e9 \U0001F600 \x00 tab\tend"
    ids = ids_of(tok, text)
    assert len(ids) == len(text.encode("utf-8")) and min(ids) >= 4 and max(ids) < 260
    assert text_of(tok, ids) == text
    assert text_of(tok, [tokenizers.BOS_ID] + ids + [tokenizers.EOS_ID]) == text


@pytest.mark.parametrize("kind, size", [("wordpiece", 400), ("sentencepiece", 300)])
def test_subword_round_trip_up_to_white_space(tmp_path, english_text, kind, size):
    tok = learned(tmp_path, kind, english_text.splitlines(), size)
    sample = " ".join(english_text[:400].split())
    ids = ids_of(tok, sample)
    assert len(ids) < 0.75 * len(sample)  # subwords, not characters
    restored = text_of(tok, ids)
    if kind == "wordpiece":  # WordPiece rejoins tokens with spaces around punctuation
        restored, sample = restored.replace(" ", ""), sample.replace(" ", "")
    assert restored == sample


def test_bpe_is_gpt2_byte_level_bpe_and_round_trips_any_text(tmp_path, english_text):
    import tokenizers as hf

    tok = learned(tmp_path, "bpe", english_text.splitlines(), 500)
    reference = hf.Tokenizer(hf.models.BPE.from_file(str(tmp_path / "bpe" / "vocab.json"),
                                                     str(tmp_path / "bpe" / "merges.txt")))
    reference.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    sample = english_text[:2000]
    ids = ids_of(tok, sample)
    assert ids == reference.encode(sample).ids  # Hugging Face's GPT-2 pipeline, token for token
    assert len(ids) < 0.6 * len(sample)  # merges learned: fewer tokens than characters
    assert text_of(tok, ids) == sample
    odd = CHINESE + "na\u00efve  caf\u00e9 \U0001F600 \x00 nul\x00\x00end\ttab [EOS] \n\n  x"
    assert text_of(tok, ids_of(tok, odd)) == odd  # any UTF-8, NUL bytes included (literal "[EOS]" is text)
    assert tokenizers.EOS_ID not in ids_of(tok, odd)
    assert text_of(tok, [tokenizers.EOS_ID] + ids + [tokenizers.EOS_ID, 0, 0]) == sample
    assert text_of(tok, ids_of(tok, "\u00e9")[:1]) == "\ufffd"  # half a character: replaced, not an error


def test_batches_in_tf_data_are_ragged(tmp_path, english_text):
    tok = learned(tmp_path, "char", english_text.splitlines())
    ds = tf.data.Dataset.from_tensor_slices(["to be", "or not"]).batch(2).map(tok.tokenize)
    (batch,) = list(ds)
    assert isinstance(batch, tf.RaggedTensor)
    assert batch.row_lengths().numpy().tolist() == [5, 6]


@pytest.mark.parametrize("config, message", [
    (TokenizerConfig("char", 3), "too small"),
    (TokenizerConfig("wordpiece", 4), "too small"),
    (TokenizerConfig("byte", 300), "fixed vocabulary of 260"),
    (TokenizerConfig("bpe", 100), "too small for bpe"),
    (TokenizerConfig("bpe", lowercase=True), "lowercase=true: applies to wordpiece and sentencepiece"),
    (TokenizerConfig("unigram"), "expected one of"),
    (TokenizerConfig("char", lowercase=True), "lowercase=true: applies to wordpiece and sentencepiece"),
])
def test_bad_configs(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        tokenizers.learn(config, ["some text"], tmp_path)


def test_sentencepiece_vocab_too_large_for_corpus(tmp_path):
    with pytest.raises(UserError, match="does not fit this corpus"):
        tokenizers.learn(TokenizerConfig("sentencepiece", 5000), ["a tiny corpus", "of two lines"], tmp_path)


SAVED_MODEL_CHECK = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # registers the ops the subword tokenizers use
out = {}
for kind, path in json.loads(sys.argv[1]).items():
    module = tf.saved_model.load(path)
    out[kind] = module.tokenize(tf.constant(json.loads(sys.argv[2]))).to_list()
assert not any(m.startswith(("keras_nlp", "keras_hub", "pipelines")) for m in sys.modules), "imported more than TF"
print(json.dumps(out))
"""


@pytest.mark.slow
def test_tokenizer_in_a_saved_model_loads_with_only_tensorflow(tmp_path, english_text):
    texts = ["To be, or not to be", CHINESE, "ab"]
    paths, expected = {}, {}
    for kind, size in [("char", 0), ("byte", 0), ("wordpiece", 300), ("sentencepiece", 200), ("bpe", 400)]:
        tok = learned(tmp_path, kind, english_text.splitlines() + CHINESE.splitlines(), size)
        module = tf.Module()
        module.tokenizer = tok
        module.tokenize = tf.function(tok.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
        paths[kind] = str(tmp_path / f"{kind}-saved")
        tf.saved_model.save(module, paths[kind])
        expected[kind] = module.tokenize(tf.constant(texts)).to_list()
    result = subprocess.run([sys.executable, "-c", SAVED_MODEL_CHECK, json.dumps(paths), json.dumps(texts)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
