"""`workdir.publish_dir`: the one way every stage publishes a directory."""

import os
import stat

import pytest

from pipelines import workdir


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_published_directory_appears_whole_with_a_normal_mode(tmp_path):
    final = tmp_path / "export" / "lm" / "1"
    with workdir.publish_dir(final) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "file").write_text("x")
        assert not final.exists() and staging.parent == final.parent  # same file system: an atomic rename
    assert (final / "sub" / "file").read_text() == "x"
    assert mode(final) == 0o777 & ~umask()  # not mkdtemp's 0700: a server running as another user reads it
    assert [p.name for p in final.parent.iterdir()] == ["1"]  # no staging left


def test_a_failed_build_leaves_nothing_not_even_the_parents_it_made(tmp_path):
    (tmp_path / "export").mkdir()
    with pytest.raises(RuntimeError):
        with workdir.publish_dir(tmp_path / "export" / "lm" / "1") as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("killed mid-build")
    assert list((tmp_path / "export").iterdir()) == []


def test_an_existing_directory_is_replaced_only_when_asked_and_only_when_the_new_one_is_done(tmp_path):
    final = tmp_path / "variant"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(FileExistsError):
        with workdir.publish_dir(final):
            pass
    with pytest.raises(RuntimeError):
        with workdir.publish_dir(final, replace=True) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["variant"] and (final / "old").is_file()
    with workdir.publish_dir(final, replace=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["variant"]


def test_staging_of_a_killed_build_is_removed_by_the_next_one_of_a_living_build_kept(tmp_path):
    dead = tmp_path / ".cls-staging-4194304-abcd"  # above Linux's largest pid_max: no such process
    alive = tmp_path / f".cls-staging-{os.getppid()}-efgh"
    for path in (dead, alive):
        path.mkdir()
        (path / "half-written").write_text("x")
    with workdir.publish_dir(tmp_path / "cls"):
        pass
    assert not dead.exists() and alive.exists() and (tmp_path / "cls").is_dir()


def test_a_scratch_build_is_never_published(tmp_path):
    with workdir.publish_dir(tmp_path / "cls", scratch=True) as staging:
        (staging / "file").write_text("x")
        assert tmp_path not in staging.parents
    assert not staging.exists() and list(tmp_path.iterdir()) == []


def test_files_are_written_whole_with_a_normal_mode(tmp_path):
    workdir.write_bytes(tmp_path / "model.tflite", b"\x00" * 10)
    workdir.write_json(tmp_path / "info.json", {"a": 1})
    assert (tmp_path / "model.tflite").read_bytes() == b"\x00" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json", "model.tflite"]
    assert mode(tmp_path / "info.json") == mode(tmp_path / "model.tflite") == 0o666 & ~umask()  # not mkstemp's 0600
