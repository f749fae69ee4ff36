"""Paths on any TensorFlow filesystem: a local path stays a `pathlib.Path`, a URI becomes a `GPath`.

Workdirs, corpora, exports and TFLite files may live in object storage
(`gs://bucket/runs/x`, `s3://`, `hdfs://`, TensorFlow's in-memory `ram://`).
`path()` turns what a user typed into something with pathlib's API: local
paths keep pathlib (and POSIX's atomic rename), URIs get `GPath`, the same
methods over `tf.io.gfile`. A `GPath` has no `__fspath__` on purpose: handing
one to `open()` or `os.*` fails loudly instead of writing a local folder
named after the scheme.

    root = fs.path("gs://bucket/runs/x")     # GPath
    (root / "config.json").read_text()
    fs.path("runs/x") / "data"               # pathlib.Path
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import posixpath
import shutil
import types
from typing import Iterator, Union

import tensorflow as tf

from pipelines.errors import UserError


class GPath:
    """A `scheme://...` path with pathlib's methods, over `tf.io.gfile`.

    Args:
        uri: `scheme://rest`; `rest` is a POSIX path (a bucket name first on object stores).
    """

    __slots__ = ("scheme", "_path")

    def __init__(self, uri: str):
        scheme, sep, rest = str(uri).partition("://")
        if not sep:
            raise ValueError(f"not a URI: {uri!r}")
        self.scheme = scheme
        self._path = posixpath.normpath(rest) if rest.strip("/") else rest[:1]

    # --- pure path operations
    def __str__(self) -> str:
        return f"{self.scheme}://{self._path}"

    def __repr__(self) -> str:
        return f"GPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: GPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, other: str | os.PathLike) -> GPath:
        other = str(other)
        if other.startswith("/") or "://" in other:
            raise ValueError(f"cannot join {other!r} to {self}")
        return GPath(f"{self.scheme}://{posixpath.join(self._path, other)}")

    def joinpath(self, *parts: str) -> GPath:
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def parent(self) -> GPath:
        return GPath(f"{self.scheme}://{posixpath.dirname(self._path)}")

    @property
    def parents(self) -> list[GPath]:
        out, path = [], self
        while path.parent != path:
            path = path.parent
            out.append(path)
        return out

    @property
    def suffixes(self) -> list[str]:
        return pathlib.PurePosixPath(self.name).suffixes

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    def with_name(self, name: str) -> GPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> GPath:
        return self.parent / (self.stem + suffix)

    def relative_to(self, other: GPath) -> pathlib.PurePosixPath:
        return pathlib.PurePosixPath(self._path).relative_to(other._path)

    def resolve(self) -> GPath:
        return self

    absolute = expanduser = resolve

    # --- the filesystem, through tf.io.gfile; its errors come out as the OSErrors pathlib raises
    def exists(self) -> bool:
        with _os_errors(self):
            return tf.io.gfile.exists(str(self))

    def is_dir(self) -> bool:
        with _os_errors(self):
            return tf.io.gfile.isdir(str(self))

    def is_file(self) -> bool:
        return self.exists() and not self.is_dir()

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.exists():
            if exist_ok and self.is_dir():
                return
            raise FileExistsError(errno.EEXIST, "exists", str(self))
        if not parents and not self.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no parent directory", str(self))
        with _os_errors(self):
            (tf.io.gfile.makedirs if parents else tf.io.gfile.mkdir)(str(self))

    def iterdir(self) -> Iterator[GPath]:
        with _os_errors(self):
            names = sorted(tf.io.gfile.listdir(str(self)))
        return iter([self / name.rstrip("/") for name in names])

    def glob(self, pattern: str) -> Iterator[GPath]:
        with _os_errors(self):
            return iter([GPath(match) for match in sorted(tf.io.gfile.glob(f"{self}/{pattern}"))])

    def rglob(self, pattern: str) -> Iterator[GPath]:
        return iter([f for f in files_under(self) if pathlib.PurePosixPath(f.name).match(pattern)])

    def open(self, mode: str = "r", encoding: str | None = None):  # GFile's text is UTF-8
        return tf.io.gfile.GFile(str(self), mode)

    def read_bytes(self) -> bytes:
        with _os_errors(self), self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with _os_errors(self), self.open("wb") as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def stat(self) -> types.SimpleNamespace:
        with _os_errors(self):
            s = tf.io.gfile.stat(str(self))
        return types.SimpleNamespace(st_size=s.length, st_mtime=s.mtime_nsec / 1e9)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        with _os_errors(self):
            tf.io.gfile.remove(str(self))

    def rmdir(self) -> None:
        if list(self.iterdir()):
            raise OSError(errno.ENOTEMPTY, "directory not empty", str(self))
        with _os_errors(self):
            tf.io.gfile.rmtree(str(self))

    def rename(self, target: GPath) -> GPath:
        with _os_errors(self):
            tf.io.gfile.rename(str(self), str(target), overwrite=False)
        return target

    def replace(self, target: GPath) -> GPath:
        with _os_errors(self):
            tf.io.gfile.rename(str(self), str(target), overwrite=True)
        return target


@contextlib.contextmanager
def _os_errors(where: GPath):
    """TensorFlow's filesystem errors as the OSErrors pathlib raises, so callers catch one kind."""
    try:
        yield
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, e.message, str(where)) from None
    except tf.errors.PermissionDeniedError as e:
        raise PermissionError(errno.EACCES, e.message, str(where)) from None
    except tf.errors.OpError as e:
        raise OSError(errno.EIO, e.message, str(where)) from None


Path = Union[pathlib.Path, GPath]


def path(value: str | os.PathLike | GPath) -> Path:
    """What a user typed as a path: a local `pathlib.Path` or a `GPath` on a TensorFlow filesystem.

    `file:///x` is the local `/x`. `~` expands in local paths.

    Raises:
        UserError: a URI scheme no TensorFlow filesystem here handles.
    """
    if isinstance(value, (pathlib.Path, GPath)):
        return value
    text = os.fspath(value)
    scheme, sep, rest = text.partition("://")
    if not sep or "/" in scheme:
        return pathlib.Path(text).expanduser()
    if scheme == "file":
        return pathlib.Path(rest)
    schemes = tf.io.gfile.get_registered_schemes()
    if scheme not in schemes:
        raise UserError(f"no filesystem here handles {scheme}:// in {text!r} (TensorFlow has: "
                        f"{', '.join(sorted(s + '://' for s in schemes if s))}); use one of those or a local path"
                        + ("; s3:// comes with `pip install tensorflow-io`" if scheme == "s3" else ""))
    return GPath(text)


def is_local(p: Path) -> bool:
    return isinstance(p, pathlib.Path)


def rmtree(p: Path) -> None:
    """Removes a directory and everything under it; no error if it is not there."""
    if is_local(p):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        try:
            tf.io.gfile.rmtree(str(p))
        except tf.errors.NotFoundError:  # ram://'s phantom children (files_under): all else is gone
            if p.exists():
                raise


def files_under(p: Path) -> list[Path]:
    """Every file under a directory, recursively."""
    if is_local(p):
        return sorted(q for q in p.rglob("*") if q.is_file())
    found = [GPath(root) / name for root, _, names in tf.io.gfile.walk(str(p)) for name in names]
    if p.scheme == "ram":  # its listing of `d/assets` also yields `.extra` for a sibling `d/assets.extra/`
        found = [f for f in found if f.exists()]
    return sorted(found)


def copy_file(src: Path, dst: Path) -> None:
    if is_local(src) and is_local(dst):
        shutil.copyfile(src, dst)
    else:
        tf.io.gfile.copy(str(src), str(dst), overwrite=True)


def size(p: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    return sum(f.stat().st_size for f in files_under(p)) if p.is_dir() else p.stat().st_size
