"""Reads lmstack .tflite files with the official TFLite Metadata tools (MediaPipe's copy of tflite-support's).

lmstack writes the metadata itself (serving/edge/metadata.py): the official writers cannot be
installed next to TF-MOT (absl-py, protobuf pins). This script runs in a separate environment that has
them and checks, for each file, that the official reader parses the metadata and finds the packed
files, that the official version check agrees with the recorded min_parser_version, and that the
official populator, given the same metadata and files, writes the same metadata:

    python3 -m venv /tmp/mp && /tmp/mp/bin/pip install mediapipe==0.10.21
    /tmp/mp/bin/python bench/tflite_metadata_official.py runs/x/tflite/*.tflite

Prints one line per file and the metadata JSON of the first; exits 1 if any check fails.
"""

import io
import json
import sys
import zipfile

from mediapipe.tasks.cc.metadata.python import _pywrap_metadata_version
from mediapipe.tasks.python.metadata import metadata as md


def check(path: str) -> tuple[bool, str, str]:
    flat = open(path, "rb").read()
    shown = md.MetadataDisplayer.with_model_buffer(flat)
    ours = json.loads(shown.get_metadata_json())
    files = shown.get_packed_associated_file_list()
    buffer = md.get_metadata_buffer(flat)
    official_version = _pywrap_metadata_version.GetMinimumMetadataParserVersion(buffer)
    # The model without the zip, re-populated by the official populator with the same metadata and files.
    archive = zipfile.ZipFile(io.BytesIO(flat))
    model = flat[:_model_end(flat)]
    populator = md.MetadataPopulator.with_model_buffer(model)
    populator.load_metadata_buffer(buffer)
    populator.load_associated_file_buffers({name: archive.read(name) for name in files})
    populator.populate()
    again = md.MetadataDisplayer.with_model_buffer(populator.get_model_buffer())
    same = (json.loads(again.get_metadata_json()) == ours
            and sorted(again.get_packed_associated_file_list()) == sorted(files))
    ok = official_version == ours["min_parser_version"] and same and bool(files)
    line = (f"{'ok  ' if ok else 'FAIL'} {path}: {len(files)} packed files, min_parser_version "
            f"{ours['min_parser_version']} (official check: {official_version}), official populator "
            f"{'writes the same' if same else 'DIFFERS'}")
    return ok, line, json.dumps(ours, indent=1)


def _model_end(flat: bytes) -> int:
    """Where the zip archive after the model begins (its first local file header)."""
    archive = zipfile.ZipFile(io.BytesIO(flat))
    first = min(info.header_offset for info in archive.infolist())
    # zipfile reports offsets relative to the archive's start; the archive starts after the model,
    # so its start is the end of central directory's offset minus the recorded directory offset.
    end_record = flat.rfind(b"PK\x05\x06")
    directory_size = int.from_bytes(flat[end_record + 12:end_record + 16], "little")
    directory_offset = int.from_bytes(flat[end_record + 16:end_record + 20], "little")
    archive_start = end_record - directory_size - directory_offset
    return archive_start + first


def main(paths: list[str]) -> int:
    results = [check(p) for p in paths]
    for _, line, _ in results:
        print(line)
    if results:
        print(results[0][2])
    return 0 if all(ok for ok, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
