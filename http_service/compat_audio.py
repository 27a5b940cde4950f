"""File ids of ``GET /v1/audio?path=...`` and HTTP byte ranges.

A file id names one finished item of one job: ``base64url(request_id "\\n" item_index)`` plus the
file's extension, e.g. ``MWYyYzRk...LjA.mp3``. It is never a path: the edge resolves it to
``GetAudio(request_id, item_index)`` with the caller's credentials, so the gateway decides whether
the file exists and belongs to the caller. Anything that is not exactly such an id (traversal,
absolute paths, percent-encoded or NUL tricks, another server's paths) is "not found".
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass
from typing import Optional

MEDIA_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg"}
_ID_PATTERN = re.compile(r"([A-Za-z0-9_-]{4,400})\.(mp3|wav|flac|ogg)")
MAX_REQUEST_ID_CHARS = 128
MAX_ITEM_INDEX = 63
AUDIO_PATH = "/v1/audio"


@dataclass(frozen=True)
class FileRef:
    request_id: str
    item_index: int
    audio_format: str   # the extension the id carries (checked against the stored file)


def file_id(request_id: str, item_index: int, audio_format: str) -> str:
    raw = f"{request_id}\n{item_index}".encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") + "." + audio_format


def parse_file_id(value: str) -> Optional[FileRef]:
    """The file an id names, or None for anything that is not an id this server issues."""
    match = _ID_PATTERN.fullmatch(value)
    if match is None:
        return None
    body, audio_format = match.groups()
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    request_id, _, index = raw.partition("\n")
    if (not request_id or len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable()
            or not index.isdigit() or not index.isascii() or int(index) > MAX_ITEM_INDEX):
        return None
    ref = FileRef(request_id, int(index), audio_format)
    return ref if file_id(ref.request_id, ref.item_index, audio_format) == value else None  # canonical only


def file_url(request_id: str, item_index: int, audio_format: str, base_url: str = "") -> str:
    """The ``file`` value of a result: ``/v1/audio?path=<id>`` (absolute when ``base_url`` is set)."""
    return f"{base_url}{AUDIO_PATH}?path={file_id(request_id, item_index, audio_format)}"


def ref_from_reference(value: str) -> Optional[FileRef]:
    """A file this server issued, named by its id or by a ``/v1/audio?path=<id>`` URL (relative or
    absolute, any host: the id alone decides); None otherwise."""
    direct = parse_file_id(value)
    if direct is not None:
        return direct
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return None
    if not parts.path.rstrip("/").endswith(AUDIO_PATH):
        return None
    ids = urllib.parse.parse_qs(parts.query).get("path", [])
    return parse_file_id(ids[0]) if len(ids) == 1 else None


class RangeNotSatisfiable(Exception):
    pass


_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")


def parse_range(header: Optional[str], total_bytes: int) -> Optional[tuple[int, int]]:
    """``(first, last)`` inclusive for a single satisfiable byte range; None to send the whole file
    (no header, another unit, several ranges or bad syntax, which RFC 9110 lets a server ignore);
    raises :class:`RangeNotSatisfiable` for a range outside the file."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    start, end = match.groups()
    if start == "":  # the last N bytes
        length = int(end)
        if length == 0 or total_bytes == 0:
            raise RangeNotSatisfiable()
        return max(total_bytes - length, 0), total_bytes - 1
    first = int(start)
    if end and int(end) < first:
        return None
    if first >= total_bytes:
        raise RangeNotSatisfiable()
    return first, min(int(end), total_bytes - 1) if end else total_bytes - 1
