"""TFLite Metadata: the model's description and files inside the .tflite, as Android and iOS tooling reads them.

TensorFlow Lite's metadata format (tflite-support's `metadata_schema.fbs`, schema 1.5.0,
file identifier "M001") is a flatbuffer stored in the model's `metadata` list under the
name `TFLITE_METADATA`; the files it names ("associated files": vocabularies, labels)
follow the model as an uncompressed zip archive, so the .tflite is also a valid zip.
Android Studio's model binding, the Task Library and MediaPipe read both.

The official writers (tflite-support, MediaPipe's `metadata_writers`) cannot be installed
next to this stack: tflite-support needs protobuf < 4 and MediaPipe absl-py >= 2.3, which
TF-MOT refuses. So this module writes and reads the part of the schema lmstack uses with
the `flatbuffers` runtime alone (ai-edge-litert's dependency), laid out field for field as
the schema declares it, and adds the buffer to the model as TensorFlow's converter adds
its own CONVERSION_METADATA (the model object re-packed). It needs no TensorFlow: the
device runtime (`serving.edge`) reads files with it.

    flat = populate(flat, {"name": ..., "description": ..., "subgraph_metadata": [...]},
                    files=[File("vocabulary.txt", data, "...", VOCABULARY)])
    packed = read(flat)  # packed.metadata (dicts as above), packed.files {name: bytes}
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from typing import Any, Sequence

import flatbuffers
import numpy as np
from flatbuffers import number_types

METADATA_NAME = "TFLITE_METADATA"  # the model's metadata entry the tooling looks for
IDENTIFIER = b"M001"
TFLITE_IDENTIFIER = b"TFL3"
# AssociatedFileType
UNKNOWN, DESCRIPTIONS, TENSOR_AXIS_LABELS, TENSOR_VALUE_LABELS, VOCABULARY = 0, 1, 2, 3, 5


@dataclasses.dataclass(frozen=True)
class _Union:
    """A union field: two slots, the member's type code (uint8) then the member table."""
    members: tuple[str, ...]  # in declaration order; code = index + 1 (0 is NONE)


# The tables lmstack writes, each field in declaration order (its vtable slot). A kind is
# "string", "byte", a table name, [kind] for a vector, or a _Union. Tables not listed here
# (Stats, TensorGroup, ...) keep their slots and are skipped when read.
_TABLES: dict[str, list[tuple[str, Any]]] = {
    "ModelMetadata": [
        ("name", "string"), ("description", "string"), ("version", "string"),
        ("subgraph_metadata", ["SubGraphMetadata"]), ("author", "string"), ("license", "string"),
        ("associated_files", ["AssociatedFile"]), ("min_parser_version", "string")],
    "SubGraphMetadata": [
        ("name", "string"), ("description", "string"), ("input_tensor_metadata", ["TensorMetadata"]),
        ("output_tensor_metadata", ["TensorMetadata"]), ("associated_files", ["AssociatedFile"]),
        ("input_process_units", ["ProcessUnit"]), ("output_process_units", ["ProcessUnit"]),
        ("input_tensor_groups", ["TensorGroup"]), ("output_tensor_groups", ["TensorGroup"]),
        ("custom_metadata", ["CustomMetadata"])],
    "TensorMetadata": [
        ("name", "string"), ("description", "string"), ("dimension_names", ["string"]), ("content", "Content"),
        ("process_units", ["ProcessUnit"]), ("stats", "Stats"), ("associated_files", ["AssociatedFile"])],
    "Content": [
        ("content_properties", _Union(("FeatureProperties", "ImageProperties", "BoundingBoxProperties",
                                       "AudioProperties"))),
        ("range", "ValueRange")],
    "FeatureProperties": [],
    "ProcessUnit": [
        ("options", _Union(("NormalizationOptions", "ScoreCalibrationOptions", "ScoreThresholdingOptions",
                            "BertTokenizerOptions", "SentencePieceTokenizerOptions", "RegexTokenizerOptions")))],
    "BertTokenizerOptions": [("vocab_file", ["AssociatedFile"])],
    "SentencePieceTokenizerOptions": [("sentencePiece_model", ["AssociatedFile"]), ("vocab_file", ["AssociatedFile"])],
    "AssociatedFile": [
        ("name", "string"), ("description", "string"), ("type", "byte"), ("locale", "string"), ("version", "string")],
}


class OutsideWeights(ValueError):
    """The model stores its weights after the flatbuffer (over 2 GB), where re-packing would move them."""


@dataclasses.dataclass(frozen=True)
class File:
    """An associated file: packed after the model and named in the metadata."""
    name: str
    data: bytes
    description: str = ""
    type: int = UNKNOWN

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "type": self.type}


@dataclasses.dataclass(frozen=True)
class Packed:
    """What a .tflite carries besides its graph: the metadata (None without) and the packed files."""
    metadata: dict[str, Any] | None
    files: dict[str, bytes]


def encode(metadata: dict[str, Any]) -> bytes:
    """A ModelMetadata flatbuffer, `min_parser_version` set from the fields used."""
    metadata = {**metadata, "min_parser_version": min_parser_version(metadata)}
    builder = flatbuffers.Builder(1024)
    builder.Finish(_build(builder, "ModelMetadata", metadata), file_identifier=IDENTIFIER)
    return bytes(builder.Output())


def decode(buffer: bytes) -> dict[str, Any]:
    """A ModelMetadata flatbuffer as nested dicts (union fields as (member, dict))."""
    if buffer[4:8] != IDENTIFIER:
        raise ValueError(f"not TFLite metadata (identifier {bytes(buffer[4:8])!r}, expected {IDENTIFIER!r})")
    return _parse(buffer, number_types.UOffsetTFlags.py_type(
        flatbuffers.encode.Get(flatbuffers.packer.uoffset, buffer, 0)), "ModelMetadata")


def min_parser_version(metadata: dict[str, Any]) -> str:
    """The oldest metadata parser that understands every field used (the schema's version history)."""
    version = (1, 0, 0)

    def visit(node):
        nonlocal version
        if isinstance(node, dict):
            if node.get("type") == VOCABULARY:
                version = max(version, (1, 0, 1))
            if node.get("input_process_units") or node.get("output_process_units"):
                version = max(version, (1, 1, 0))
            if node.get("version") and "type" in node:  # an AssociatedFile's version
                version = max(version, (1, 4, 1))
            for value in node.values():
                visit(value)
        elif isinstance(node, tuple):  # a union member
            version = max(version, {"BertTokenizerOptions": (1, 1, 0), "SentencePieceTokenizerOptions": (1, 1, 0),
                                    "RegexTokenizerOptions": (1, 2, 1)}.get(node[0], (1, 0, 0)))
            visit(node[1])
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit({k: v for k, v in metadata.items() if k != "min_parser_version"})
    return ".".join(map(str, version))


def populate(flat: bytes, metadata: dict[str, Any], files: Sequence[File] = ()) -> bytes:
    """The model with `metadata` in its TFLITE_METADATA entry and `files` zipped after it.

    `files` are the associated files the metadata names (every name it uses must be among
    them, as the official populator requires); a previous metadata entry is replaced.
    """
    from ai_edge_litert import schema_py_generated as schema

    names = {f.name for f in files}
    missing = sorted(_file_names(metadata) - names)
    if missing:
        raise ValueError(f"the metadata names files that are not packed: {', '.join(missing)}")
    if len(names) != len(files):
        raise ValueError("two associated files share a name")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(flat, 0))
    if any((b.offset or 0) > 1 for b in model.buffers or []):
        raise OutsideWeights("the model keeps its weights after the flatbuffer (a file over 2 GB): no metadata "
                             "(TensorFlow's converter skips its own there too)")
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(encode(metadata), np.uint8)
    model.metadata = model.metadata or []
    entry = next((m for m in model.metadata if m.name == METADATA_NAME.encode()), None)
    if entry is None:  # a new entry and buffer; a previous one's buffer is overwritten, not left behind
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers)
        model.buffers.append(buffer)
        model.metadata.append(entry)
    else:
        model.buffers[entry.buffer] = buffer
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    out = io.BytesIO(bytes(builder.Output()))
    if files:
        with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:  # stored: apps map them
            for f in files:
                archive.writestr(f.name, f.data)
    return out.getvalue()


def read(flat: bytes) -> Packed:
    """The metadata and packed files of a .tflite's bytes (None and {} for a file without them)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flat, 0)
    metadata = None
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            metadata = decode(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return Packed(metadata, packed_files(flat))


def packed_files(flat: bytes) -> dict[str, bytes]:
    """The files zipped after the model, by name ({} for none); reads no flatbuffer."""
    if not zipfile.is_zipfile(io.BytesIO(flat)):
        return {}
    with zipfile.ZipFile(io.BytesIO(flat)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _file_names(node) -> set[str]:
    """Every AssociatedFile name in a metadata tree."""
    if isinstance(node, dict):
        own = {node["name"]} if "type" in node and "name" in node else set()
        return own.union(*(_file_names(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_file_names(v) for v in node))
    return set()


def _build(builder: flatbuffers.Builder, table: str, value: dict[str, Any]) -> int:
    """Writes one table (its strings, vectors and sub-tables first, as flatbuffers requires)."""
    slots = []  # (slot, kind, built value)
    slot = 0
    for name, kind in _TABLES[table]:
        given = value.get(name)
        if isinstance(kind, _Union):
            if given is not None:
                member, fields = given
                slots.append((slot, "code", kind.members.index(member) + 1))
                slots.append((slot + 1, "offset", _build(builder, member, fields)))
            slot += 2
            continue
        if given is not None and given != "" and given != []:
            if kind == "string":
                slots.append((slot, "offset", builder.CreateString(given)))
            elif kind == "byte":
                slots.append((slot, "byte", int(given)))
            elif isinstance(kind, list):
                items = [builder.CreateString(v) if kind[0] == "string" else _build(builder, kind[0], v)
                         for v in given]
                builder.StartVector(4, len(items), 4)
                for item in reversed(items):
                    builder.PrependUOffsetTRelative(item)
                slots.append((slot, "offset", builder.EndVector()))
            else:
                slots.append((slot, "offset", _build(builder, kind, given)))
        slot += 1
    builder.StartObject(slot)
    for index, kind, built in slots:
        if kind == "offset":
            builder.PrependUOffsetTRelativeSlot(index, built, 0)
        elif kind == "code":
            builder.PrependUint8Slot(index, built, 0)
        else:
            builder.PrependInt8Slot(index, built, 0)
    return builder.EndObject()


def _parse(buffer: bytes, position: int, table: str) -> dict[str, Any]:
    """Reads one table at `position`; fields absent from the buffer are absent from the dict."""
    t = flatbuffers.table.Table(bytearray(buffer), position)
    out: dict[str, Any] = {}
    slot = 0
    for name, kind in _TABLES[table]:
        if isinstance(kind, _Union):
            code, at = t.Offset(4 + 2 * slot), t.Offset(4 + 2 * (slot + 1))
            slot += 2
            if code and at:
                member = kind.members[t.Get(number_types.Uint8Flags, code + t.Pos) - 1]
                if member in _TABLES:
                    out[name] = (member, _parse(buffer, t.Indirect(at + t.Pos), member))
            continue
        at = t.Offset(4 + 2 * slot)
        slot += 1
        if not at:
            continue
        if kind == "string":
            out[name] = t.String(at + t.Pos).decode("utf-8")
        elif kind == "byte":
            out[name] = t.Get(number_types.Int8Flags, at + t.Pos)
        elif isinstance(kind, list):
            start, count = t.Vector(at), t.VectorLen(at)
            if kind[0] == "string":
                out[name] = [t.String(start + 4 * i).decode("utf-8") for i in range(count)]
            elif kind[0] in _TABLES:
                out[name] = [_parse(buffer, t.Indirect(start + 4 * i), kind[0]) for i in range(count)]
        elif kind in _TABLES:
            out[name] = _parse(buffer, t.Indirect(at + t.Pos), kind)
    return out
