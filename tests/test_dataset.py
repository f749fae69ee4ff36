import numpy as np
import pytest
import tensorflow as tf

from pipelines import dataset
from pipelines import prepare as prepare_lib
from pipelines import tokenizers
from pipelines.errors import UserError

SEQ, BATCH = 16, 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, english_text):
    root = tmp_path_factory.mktemp("ds")
    (root / "corpus.txt").write_text(english_text, encoding="utf-8")
    config = prepare_lib.PrepareConfig(corpus=(str(root / "corpus.txt"),),
                                       tokenizer=tokenizers.TokenizerConfig("char"))
    prepare_lib.prepare(config, root / "run")
    return root / "run"


def shard_streams(workdir, split):
    """The token stream of every shard, read back without tf.data."""
    streams = []
    for path in dataset.shard_files(workdir, split):
        records = tf.data.TFRecordDataset(path, compression_type="GZIP")
        streams.append(np.concatenate([np.frombuffer(r.numpy(), "<i4") for r in records]))
    return streams


def windows(ds):
    return [tuple(x) + (y[-1],) for xb, yb in ds.as_numpy_iterator() for x, y in zip(xb, yb)]


def test_batches_are_shifted_windows_of_the_stream(workdir):
    ds = dataset.train_dataset(workdir, SEQ, BATCH, seed=0)
    assert ds.element_spec == (tf.TensorSpec([BATCH, SEQ], tf.int32), tf.TensorSpec([BATCH, SEQ], tf.int32))
    streams = [s.tobytes() for s in shard_streams(workdir, "train")]
    for x, y in ds.take(5).as_numpy_iterator():
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = np.append(row_x, row_y[-1]).astype("<i4").tobytes()
            assert any(window in s for s in streams)  # contiguous text, not a mix of shards


def test_same_seed_same_batches(workdir):
    def first(seed):
        return [x for x, _ in dataset.train_dataset(workdir, SEQ, BATCH, seed=seed).take(6).as_numpy_iterator()]
    a, b, c = first(7), first(7), first(8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_one_epoch_yields_every_window_once(workdir):
    ds = dataset.train_dataset(workdir, SEQ, batch_size=1, repeat=False)
    expected = sum(len(s) // (SEQ + 1) for s in shard_streams(workdir, "train"))
    assert len(windows(ds)) == expected


def test_two_workers_read_disjoint_shards_that_cover_the_data(workdir):
    per_worker = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        per_worker.append(windows(dataset.train_dataset(workdir, SEQ, 1, repeat=False, input_context=context)))
    everything = windows(dataset.train_dataset(workdir, SEQ, 1, repeat=False))
    assert per_worker[0] and per_worker[1]
    assert len(per_worker[0]) + len(per_worker[1]) == len(everything)
    assert sorted(per_worker[0] + per_worker[1]) == sorted(everything)
    assert not set(per_worker[0]) & set(per_worker[1])


def test_validation_is_deterministic_and_unshuffled(workdir):
    a = windows(dataset.val_dataset(workdir, SEQ, BATCH))
    b = windows(dataset.val_dataset(workdir, SEQ, BATCH))
    assert a == b and len(a) > 0
    streams = shard_streams(workdir, "val")
    assert len(a) == sum(len(s) // (SEQ + 1) for s in streams) // BATCH * BATCH


def test_more_workers_than_shards_is_a_clear_error(workdir):
    context = tf.distribute.InputContext(num_input_pipelines=64, input_pipeline_id=0, num_replicas_in_sync=64)
    with pytest.raises(UserError, match="cannot feed 64 input pipelines"):
        dataset.train_dataset(workdir, SEQ, 1, input_context=context)


def test_unprepared_workdir(tmp_path):
    with pytest.raises(UserError, match="lmstack prepare"):
        dataset.train_dataset(tmp_path, SEQ, BATCH)
