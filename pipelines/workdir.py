"""The workdir: the run directory that is the contract between stages.

Every stage reads and writes one workdir (docs/design.md, "The workdir is the contract between stages"):

    runs/NAME/
      config.json      every config of the run, one section per stage
      tokenizer/       tokenizer.json + vocabulary / SentencePiece model
      data/            train/val TFRecord shards + manifest.json
      checkpoints/ logs/ metrics.json optimized/ export/ tflite/ report/

Writes are atomic: a file is written under a temporary name and renamed, a
directory is built in a staging directory and renamed, so a crash never leaves
a half-written artifact that a later stage would trust.

The workdir may be a local path or a URI on any TensorFlow filesystem
(`gs://bucket/runs/x`, `ram://...`; `pipelines/fs.py`). Object stores have
no atomic directory rename: there a directory is built under a staging
prefix, copied into place with its index files (config.json, manifest.json,
saved_model.pb, ...) last, and committed by a marker file written after
everything else (`PUBLISHED_MARKER`), which readers require (`published`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import secrets
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator

from pipelines import fs
from pipelines.errors import UserError

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
MANIFEST_FILE = "manifest.json"
IMPORT_SECTION = "import"  # config.json of a workdir made by `lmstack import`: a model before any data
# Written last into a directory published on an object store; its readers require it.
PUBLISHED_MARKER = ".lmstack-published"
# Copied last (before the marker) when publishing on an object store: the files readers look for first.
INDEX_FILES = (MANIFEST_FILE, "tokenizer.json", "saved_model.pb", "fingerprint.pb", CONFIG_FILE)
# Staging left by a process on another machine is removed once untouched this long.
STALE_STAGING_SECONDS = 24 * 3600

# Everything a stage may write at the top of a workdir. `prepare --overwrite`
# removes these, since they were all built from the old data and tokenizer.
STAGE_OUTPUTS = (
    CONFIG_FILE, TOKENIZER_DIR, DATA_DIR, "checkpoints", "logs", "metrics.json",
    "optimized", "export", "tflite", "report",
)


class Workdir:
    """Paths of one run directory.

    Args:
        root: the run directory; it need not exist yet.
    """

    def __init__(self, root: str | os.PathLike | fs.GPath):
        self.root = fs.path(root)

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"

    @property
    def config_path(self) -> fs.Path:
        return self.root / CONFIG_FILE

    @property
    def tokenizer_dir(self) -> fs.Path:
        return self.root / TOKENIZER_DIR

    @property
    def data_dir(self) -> fs.Path:
        return self.root / DATA_DIR

    @property
    def manifest_path(self) -> fs.Path:
        return self.data_dir / MANIFEST_FILE

    def is_prepared(self) -> bool:
        """True once `prepare` has committed (config.json is written last)."""
        return self.config_path.is_file() and self.manifest_path.is_file() and published(self.data_dir)

    def is_imported(self) -> bool:
        """True for a workdir made by `lmstack import` (a pre-trained model, with or without data)."""
        return self.config_path.is_file() and IMPORT_SECTION in read_json(self.config_path)

    def read_config(self) -> dict[str, Any]:
        """The run's config.json; raises UserError if the workdir is neither prepared nor imported."""
        if not (self.is_prepared() or self.is_imported()):
            raise UserError(
                f"{self.root} is not a prepared lmstack workdir (no {CONFIG_FILE} "
                f"or {DATA_DIR}/{MANIFEST_FILE}); run `lmstack prepare --workdir={self.root}` first")
        return read_json(self.config_path)

    def read_manifest(self) -> dict[str, Any]:
        self.read_config()  # same check, same message
        if not self.manifest_path.is_file():
            raise UserError(f"{self.root} holds an imported model but no data yet; run `lmstack prepare "
                            f"--workdir={self.root} --corpus=FILES` (it tokenizes with the imported tokenizer)")
        return read_json(self.manifest_path)

    def update_config(self, section: str, values: dict[str, Any]) -> None:
        """Writes one stage's section of config.json, keeping the others."""
        config = read_json(self.config_path) if self.config_path.is_file() else {}
        config[section] = values
        write_json(self.config_path, config)


def read_json(path: str | os.PathLike | fs.GPath) -> Any:
    return json.loads(fs.path(path).read_text(encoding="utf-8"))


def write_json(path: str | os.PathLike | fs.GPath, obj: Any) -> None:
    """Writes JSON atomically: a reader sees the old file or the new one, never half."""
    write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def write_png(figure, path: str | os.PathLike | fs.GPath) -> None:
    """Writes a matplotlib figure as a PNG, atomically, on any filesystem (matplotlib writes local files only)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes(path, buffer.getvalue())


def write_bytes(path: str | os.PathLike | fs.GPath, data: bytes) -> None:
    """Writes a file atomically (a temporary name in the same directory, fsync, rename)."""
    path = fs.path(path)
    if not fs.is_local(path):  # an object appears whole when its upload ends; rename is a copy there
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: fs.Path) -> bool:
    """Creates `path` if needed and checks we can write in it.

    Returns:
        True if this call created the directory (so a failed stage may remove it).
    Raises:
        UserError: the directory cannot be created or written.
    """
    existed = path.exists()
    if existed and not path.is_dir():
        raise UserError(f"workdir {path} exists and is not a directory; choose another --workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if fs.is_local(path):
            tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-").close()
        else:
            probe = path / f".write-probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise UserError(
            f"cannot write to workdir {path}: {e.strerror}; choose a writable --workdir") from None
    return not existed


def published(path: fs.Path) -> bool:
    """True if a directory built by `publish_dir` is complete (on an object store: its marker is there)."""
    return path.is_dir() if fs.is_local(path) else (path / PUBLISHED_MARKER).exists()


@contextlib.contextmanager
def publish_dir(final: str | os.PathLike | fs.GPath, *, replace: bool = False, scratch: bool = False,
                ) -> Iterator[fs.Path]:
    """Builds a directory that appears at `final` whole or not at all.

    Every stage that writes a directory builds it here. Yields a hidden staging
    directory next to `final` (`.NAME-staging-PID-XXXX`, in the same file system,
    so the rename is atomic); when the block ends without an exception the
    staging directory gets a normal directory's mode (mkdtemp's 0700 would hide
    it from a server running as another user) and is renamed to `final`. On an
    exception it is removed, and so are the parents this call created. A process
    killed mid-build (kill -9) cannot clean up: the next build of the same name
    removes staging directories whose process is gone.

    On an object store (a `GPath`) the staging prefix is copied into `final`
    instead, index files last, then `PUBLISHED_MARKER` is written: `published()`
    is true from that moment. Replacing removes the old marker first.

    Args:
        final: where the finished directory goes.
        replace: replace an existing `final` (only once the new one is complete);
            otherwise an existing `final` is an error (FileExistsError).
        scratch: build in a temporary directory elsewhere and never publish it
            (a non-chief worker of a multi-worker job).
    """
    final = fs.path(final)
    if scratch:
        path = pathlib.Path(tempfile.mkdtemp(prefix=f"lmstack-worker-{final.name}-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    created = _make_parents(final.parent)
    staging = _staging(final.parent, final.name)
    try:
        yield staging
        if not fs.is_local(final):
            _copy_in(staging, final, replace)
        else:
            os.chmod(staging, 0o777 & ~_umask())
            if final.exists() and replace:
                old = final.with_name(f".{final.name}-replaced-{os.getpid()}")
                os.rename(final, old)
                os.rename(staging, final)
                shutil.rmtree(old, ignore_errors=True)
            elif final.exists():
                raise FileExistsError(f"{final} exists")
            else:
                os.rename(staging, final)
    except BaseException:
        if created is not None:
            fs.rmtree(created)
        raise
    finally:
        fs.rmtree(staging)


def _copy_in(staging: fs.GPath, final: fs.GPath, replace: bool) -> None:
    """Publishes on an object store: the files into `final`, index files last, then the marker."""
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} exists")
        (final / PUBLISHED_MARKER).unlink(missing_ok=True)  # readers stop trusting it from here
        fs.rmtree(final)
    files = sorted(fs.files_under(staging), key=lambda f: (f.name in INDEX_FILES, str(f)))
    final.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = final / str(f.relative_to(staging))
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.copy_file(f, target)
    (final / PUBLISHED_MARKER).write_bytes(b"")


def _make_parents(path: fs.Path) -> fs.Path | None:
    """Creates `path` and its missing parents; returns the topmost one created (None if it existed)."""
    top = None
    for parent in (path, *path.parents):
        if parent.exists() or not parent.name:  # an object store's root (bucket) is never created here
            break
        top = parent
    path.mkdir(parents=True, exist_ok=True)
    return top


def _staging(parent: fs.Path, name: str) -> fs.Path:
    """A new `parent/.NAME-staging-PID-XXXX`, after removing those of processes that are gone.

    On an object store the name ends in `@HOST`: staging of a dead process on this
    host goes at once, another host's once untouched for `STALE_STAGING_SECONDS`.
    """
    host = socket.gethostname()
    for old in parent.glob(f".{name}-staging-*"):
        rest, _, owner = old.name[len(f".{name}-staging-"):].partition("@")
        try:
            pid = int(rest.split("-", 1)[0])
        except ValueError:
            continue
        if fs.is_local(old) or owner == host:
            stale = not _alive(pid)
        else:
            stale = time.time() - max((f.stat().st_mtime for f in fs.files_under(old)), default=time.time()) \
                > STALE_STAGING_SECONDS
        if stale:
            fs.rmtree(old)
    if fs.is_local(parent):
        return pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}-staging-{os.getpid()}-"))
    staging = parent / f".{name}-staging-{os.getpid()}-{secrets.token_hex(4)}@{host}"
    staging.mkdir(parents=True)
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def remove_stage_outputs(workdir: Workdir) -> list[str]:
    """Removes every stage output of a workdir; returns the names removed."""
    removed = []
    for name in STAGE_OUTPUTS:
        path = workdir.root / name
        if path.is_dir():
            fs.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
