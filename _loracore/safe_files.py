"""Safetensors files written and read with an integrity check, and pairs of files replaced
together (no framework here: ``serialize`` and ``framework`` name numpy's or torch's side).

A safetensors file is an 8-byte little-endian header length, a JSON header ({key: {dtype,
shape, data_offsets}}, and "__metadata__": {str: str}), then the tensors' bytes. The files
written here carry ``lora_sha256`` in their metadata: a sha256 over each tensor's key, dtype,
shape and bytes, in sorted key order, checked on read when present.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import safetensors

CHECKSUM_KEY = "lora_sha256"


def weights_bytes(
    tensors: Mapping[str, Any], metadata: Mapping[str, str], serialize: Callable[..., bytes]
) -> bytes:
    """The file's bytes, with ``metadata`` and the checksum of its tensors."""
    header, data = split(serialize(dict(tensors), metadata=dict(metadata)), "the new adapter")
    blob = serialize(dict(tensors), metadata={**metadata, CHECKSUM_KEY: checksum(header, data)})
    return _sorted_metadata(blob)


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` with its header's metadata in sorted key order. safetensors writes the
    metadata from a hash map whose order changes from call to call, so the same adapter saved
    twice gave different bytes. The header is re-encoded compactly, padded with spaces to a
    multiple of 8 bytes as safetensors pads it; the data offsets count from the data's start,
    so the tensors' bytes follow unchanged."""
    header, data = split(blob, "the new adapter")
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text = text.ljust(-(-len(text) // 8) * 8)
    return struct.pack("<Q", len(text)) + text + data


def write_files(directory: Path, contents: Mapping[str, bytes]) -> None:
    """Writes every file under a temporary name first, then renames each into place (in
    order): a failure while writing leaves every previous file intact; only a crash between
    the renames leaves some files new and the others old."""
    directory.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    try:
        for name, blob in contents.items():
            temps.append(_temp(directory / name, _writer(blob)))
        for name, tmp in zip(contents, list(temps), strict=True):
            os.replace(tmp, directory / name)
            temps.remove(tmp)
    finally:
        _remove(*temps)


def _writer(blob: bytes) -> Callable[[BinaryIO], object]:
    """What ``_temp`` calls with the open file to fill it: writes ``blob``."""
    return lambda f: f.write(blob)


def _temp(final: Path, write: Callable[[BinaryIO], object]) -> str:
    """Writes a temporary file beside ``final`` (flushed to disk); returns its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def split(blob: bytes, where: Any) -> tuple[dict[str, Any], bytes]:
    """(header, data) of a safetensors file's bytes: an 8-byte little-endian header length,
    the JSON header ({key: {dtype, shape, data_offsets}}, and "__metadata__"), the data."""
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        if length > len(blob) - 8:
            raise ValueError(f"a header of {length} bytes in a file of {len(blob)}")
        header = json.loads(blob[8 : 8 + length])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{where}: cannot be read as safetensors, it may be truncated or corrupted ({err})"
        ) from None
    return header, blob[8 + length :]


def checksum(header: Mapping[str, Any], data: bytes) -> str:
    """sha256 over each tensor's key, dtype, shape and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(k for k in header if k != "__metadata__"):
        info = header[key]
        start, end = info["data_offsets"]
        described = json.dumps([key, info["dtype"], info["shape"], end - start])
        digest.update(described.encode() + b"\0")
        digest.update(data[start:end])
    return digest.hexdigest()


def read_weights(path: Path, framework: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The metadata and tensors of a weights file, after checking its checksum (when it has
    one: PEFT's files don't) and that every tensor is floating point."""
    blob = path.read_bytes()
    header, data = split(blob, path)
    try:
        with safetensors.safe_open(path, framework=framework) as f:  # validates the header
            raw = {key: f.get_tensor(key) for key in f.keys()}
        metadata = header.get("__metadata__") or {}
        if CHECKSUM_KEY in metadata and metadata[CHECKSUM_KEY] != checksum(header, data):
            raise ValueError("its tensor data does not match the checksum it was saved with")
    except (safetensors.SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: cannot be read as safetensors, it may be truncated or corrupted ({err})"
        ) from None
    for key in sorted(raw):
        if header[key]["dtype"] not in FLOAT_DTYPES:
            raise ValueError(
                f"{path}: tensor '{key}' has dtype {header[key]['dtype']}; adapter tensors must "
                f"be floating point ({', '.join(FLOAT_DTYPES)})"
            )
    return metadata, raw
