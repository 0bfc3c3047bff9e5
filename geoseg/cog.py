"""Cloud Optimized GeoTIFF bytes from tiles compressed elsewhere: the layout GDAL's COG driver writes.

A file is: the TIFF header; GDAL's "ghost" structural metadata (which makes GDAL report ``LAYOUT=COG``);
the IFD of the full resolution then those of the overviews, largest first, each with its out-of-line tag
values; then the tiles, coarsest overview first and full resolution last, row-major within a level, each
tile preceded by its size (uint32) and followed by a copy of its last 4 bytes, as the ghost metadata
promises (GDAL checks both to detect files that a non-COG-aware writer has changed). Tiles are 8-bit,
one band, deflate (zlib streams, made with ISA-L: several times faster than zlib at its fastest level, for
about the size of zlib's default). Georeferencing, colour table, no-data and metadata tags are taken from a
template TIFF, so that GDAL writes them exactly as it would for this raster.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from geoseg.arrays import Band

BLOCK = 512  # tile side, GDAL's COG default
DEFLATE_LEVEL = 1
GHOST = ("LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
         "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n ")
CLASSIC_LIMIT = 2**32 - 1  # the last byte a classic TIFF can address

Sizes = npt.NDArray[np.int64]  # byte counts or offsets, one per tile

SHORT, LONG, LONG8 = 3, 4, 16
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_FORMAT = {SHORT: "H", LONG: "I", LONG8: "Q"}
# tags this module writes itself; every other tag of the template describes the raster and is copied
_LAYOUT_TAGS = {254, 256, 257, 259, 273, 278, 279, 317, 322, 323, 324, 325}
# what an overview carries besides its layout: GDAL writes these and no georeferencing
_OVERVIEW_TAGS = {258, 262, 277, 284, 320, 339, 42113}


@dataclass(frozen=True)
class Tag:
    """One TIFF field: its type, count and value bytes (little-endian)."""

    type: int
    count: int
    value: bytes


@dataclass(frozen=True)
class Level:
    """One resolution of the file: its size and the compressed size of each tile, row-major."""

    height: int
    width: int
    sizes: Sizes


def deflate_tiles(band: Band, level: int = DEFLATE_LEVEL) -> tuple[npt.NDArray[np.uint8], Sizes]:
    """Split a band whose origin is on the tile grid into ``BLOCK`` tiles (row-major, edge tiles padded
    with 0) and deflate each; returns the tiles' bytes end to end (uint8) and each tile's size."""
    h, w = band.shape
    pad = np.zeros((BLOCK, BLOCK), np.uint8)
    pieces = []
    for r in range(0, h, BLOCK):
        for c in range(0, w, BLOCK):
            tile = band[r:r + BLOCK, c:c + BLOCK]
            if tile.shape != (BLOCK, BLOCK):
                pad[:] = 0
                pad[:tile.shape[0], :tile.shape[1]] = tile
                tile = pad
            pieces.append(isal_zlib.compress(np.ascontiguousarray(tile), level))
    sizes = np.array([len(p) for p in pieces], np.int64)
    return np.frombuffer(b"".join(pieces), np.uint8), sizes


def split(blob: npt.NDArray[np.uint8], sizes: Sizes) -> Iterator[memoryview]:
    """The tiles of a :func:`deflate_tiles` result, one by one, without copying."""
    ends = np.cumsum(sizes)
    for end, size in zip(ends.tolist(), sizes.tolist(), strict=True):
        yield blob.data[end - size:end]


def template_tags(tiff: bytes) -> dict[int, Tag]:
    """The fields of the first IFD of a little-endian classic TIFF (the template GDAL wrote)."""
    if tiff[:4] != b"II*\x00":
        raise ValueError("template must be a little-endian classic TIFF")
    (ifd,) = struct.unpack_from("<I", tiff, 4)
    (n,) = struct.unpack_from("<H", tiff, ifd)
    tags = {}
    for k in range(n):
        tag, typ, count, raw = struct.unpack_from("<HHI4s", tiff, ifd + 2 + 12 * k)
        size = _TYPE_SIZE[typ] * count
        if size > 4:
            (at,) = struct.unpack("<I", raw)
            raw = tiff[at:at + size]
        tags[tag] = Tag(typ, count, raw[:size])
    return tags


def _number(tag_type: int, values: Sequence[int]) -> Tag:
    return Tag(tag_type, len(values), struct.pack(f"<{len(values)}{_FORMAT[tag_type]}", *values))


def _ifd_fields(level: Level, index: int, template: dict[int, Tag], offsets: Sizes, bigtiff: bool) -> dict[int, Tag]:
    side = SHORT if max(level.width, level.height) < 2**16 else LONG
    word = LONG8 if bigtiff else LONG
    fields = {t: v for t, v in template.items() if t not in _LAYOUT_TAGS and (index == 0 or t in _OVERVIEW_TAGS)}
    fields.update({256: _number(side, [level.width]), 257: _number(side, [level.height]),
                   259: _number(SHORT, [8]), 317: _number(SHORT, [1]),
                   322: _number(SHORT, [BLOCK]), 323: _number(SHORT, [BLOCK]),
                   324: _number(word, offsets.tolist()), 325: _number(word, level.sizes.tolist())})
    if index > 0:
        fields[254] = _number(LONG, [1])  # reduced-resolution image
    return fields


def _ifds(levels: Sequence[Level], template: dict[int, Tag], offsets: Sequence[Sizes], start: int,
          bigtiff: bool) -> bytes:
    """The IFDs of every level, one after the other from ``start``, each followed by its out-of-line values."""
    entry, count_fmt, value_fmt, inline = ("<HHQ", "<Q", "<Q", 8) if bigtiff else ("<HHI", "<H", "<I", 4)
    out = bytearray()
    for i, (level, offs) in enumerate(zip(levels, offsets, strict=True)):
        fields = sorted(_ifd_fields(level, i, template, offs, bigtiff).items())
        here = start + len(out)
        table = (struct.calcsize(count_fmt) + len(fields) * (struct.calcsize(entry) + inline)
                 + struct.calcsize(value_fmt))
        extra = bytearray()
        entries = bytearray(struct.pack(count_fmt, len(fields)))
        for tag, f in fields:
            entries += struct.pack(entry, tag, f.type, f.count)
            if len(f.value) <= inline:
                entries += f.value.ljust(inline, b"\x00")
            else:
                entries += struct.pack(value_fmt, here + table + len(extra))
                extra += f.value + b"\x00" * (len(f.value) % 2)  # values start on a word boundary
        last = i == len(levels) - 1
        entries += struct.pack(value_fmt, 0 if last else here + table + len(extra))
        out += entries + extra
    return bytes(out)


def _head(bigtiff: bool) -> bytes:
    """The TIFF header and GDAL's ghost structural metadata; the first IFD follows them."""
    text = f"GDAL_STRUCTURAL_METADATA_SIZE={len(GHOST):06d} bytes\n{GHOST}".encode()
    text += b"\x00" * (len(text) % 2)
    if bigtiff:
        return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16 + len(text)) + text
    return b"II*\x00" + struct.pack("<I", 8 + len(text)) + text


def _tile_offsets(levels: Sequence[Level], template: dict[int, Tag], bigtiff: bool) -> tuple[list[Sizes], int]:
    """Where each tile's bytes start, tiles written coarsest level first after the IFDs; and the file's size."""
    start = len(_head(bigtiff))
    placeholder = [np.zeros(len(lv.sizes), np.int64) for lv in levels]
    pos = start + len(_ifds(levels, template, placeholder, start, bigtiff))  # IFD sizes do not depend on offsets
    offsets: list[Sizes] = [np.empty(0, np.int64)] * len(levels)
    for i in reversed(range(len(levels))):
        framed = levels[i].sizes + 8  # its size before each tile, its last 4 bytes after
        offsets[i] = pos + 4 + np.concatenate([[0], np.cumsum(framed)[:-1]]).astype(np.int64)
        pos += int(framed.sum())
    return offsets, pos


def header(levels: Sequence[Level], template: dict[int, Tag], bigtiff: bool | None = None
           ) -> tuple[bytes, list[Sizes]]:
    """The bytes before the first tile and each level's tile offsets, for tiles written as :func:`write` does.

    ``bigtiff`` None: BigTIFF only when the file would pass the 4 GiB a classic TIFF can address.
    """
    if bigtiff is None:
        bigtiff = _tile_offsets(levels, template, False)[1] - 1 > CLASSIC_LIMIT
    offsets, _ = _tile_offsets(levels, template, bigtiff)
    head = _head(bigtiff)
    return head + _ifds(levels, template, offsets, len(head), bigtiff), offsets


def write(out: BinaryIO, levels: Sequence[Level], template: dict[int, Tag],
          tiles: Callable[[int], Iterable[memoryview]], bigtiff: bool | None = None) -> None:
    """Write a COG: ``tiles(i)`` yields level ``i``'s compressed tiles in row-major order (level 0 is full
    resolution), with the sizes given in ``levels``."""
    head, _ = header(levels, template, bigtiff)
    out.write(head)
    for i in reversed(range(len(levels))):
        expected = levels[i].sizes
        n = 0
        for tile in tiles(i):
            if len(tile) != expected[n]:
                raise ValueError(f"tile {n} of level {i} has {len(tile)} bytes, {expected[n]} announced")
            out.write(struct.pack("<I", len(tile)))
            out.write(tile)
            out.write(tile[-4:])
            n += 1
        if n != len(expected):
            raise ValueError(f"level {i} got {n} tiles, {len(expected)} announced")
