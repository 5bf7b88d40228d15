"""The trainer's picture of expert load: <out_dir>/expert_load.png from metrics.jsonl, standard library only.

    python -m launch.expert_load runs/tiny          # (re)writes runs/tiny/expert_load.png

One heat map per MoE layer, stacked top to bottom with a 1-pixel white line
between layers: a row per expert (expert 0 on top), a column per step (steps
averaged in bins when there are more than MAX_COLUMNS), the colour each
expert's share of the step's kept assignments (metrics.jsonl's
`expert_share`). The scale is fixed per layer so that pictures compare:
dark purple is 0, teal the balanced share 1 / E, yellow 2 / E or more. A
balanced layer is a flat teal band; an expert that takes everything is a
yellow row over dark ones. No optional dependency: the trainer writes it
at the end of every run.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

MAX_COLUMNS = 800  # more steps than this are averaged in bins
MAX_CELL_WIDTH = 16  # pixels per step when there are few steps
MAX_CELL_HEIGHT = 12  # pixels per expert when there are few experts
PANEL_HEIGHT = 96  # pixels per layer that the experts share (each at least 1)
SEPARATOR = (255, 255, 255)

# viridis at 0, 1/4, 1/2, 3/4, 1: dark to bright, readable in grey and by most colour-blind readers.
_ANCHORS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def colour(value: float) -> tuple[int, int, int]:
    """RGB for `value` in [0, 1] (clipped), linear between the viridis anchors."""
    position = min(max(value, 0.0), 1.0) * (len(_ANCHORS) - 1)
    low = min(int(position), len(_ANCHORS) - 2)
    frac = position - low
    a, b = _ANCHORS[low], _ANCHORS[low + 1]
    return tuple(round(x + (y - x) * frac) for x, y in zip(a, b))


def share_columns(shares_per_step: list[list[list[float]]]) -> list[list[list[float]]]:
    """Per layer, per expert, the share in each column: [steps][layers][E] -> [layers][E][columns].

    With more than MAX_COLUMNS steps, a column is the mean of ceil(steps / MAX_COLUMNS) consecutive steps.
    """
    per_bin = math.ceil(len(shares_per_step) / MAX_COLUMNS)
    bins = [shares_per_step[i : i + per_bin] for i in range(0, len(shares_per_step), per_bin)]
    layers = []
    for layer in range(len(shares_per_step[0])):
        experts = len(shares_per_step[0][layer])
        layers.append(
            [[sum(step[layer][e] for step in group) / len(group) for group in bins] for e in range(experts)]
        )
    return layers


def render(layers: list[list[list[float]]]) -> tuple[int, int, list[bytes]]:
    """(width, height, RGB rows) of the stacked heat maps of `layers` [layers][E][columns]."""
    columns = len(layers[0][0])
    cell_w = max(1, min(MAX_CELL_WIDTH, MAX_COLUMNS // columns))
    width = columns * cell_w
    separator = bytes(SEPARATOR) * width
    rows: list[bytes] = []
    for index, experts in enumerate(layers):
        if index:
            rows.append(separator)
        cell_h = max(1, min(MAX_CELL_HEIGHT, PANEL_HEIGHT // len(experts)))
        full_scale = 2.0 / len(experts)  # twice the balanced share is the top of the scale
        for shares in experts:
            row = b"".join(bytes(colour(share / full_scale)) * cell_w for share in shares)
            rows.extend([row] * cell_h)
    return width, len(rows), rows


def encode_png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG of `rows` (each 3 * width bytes), no filtering."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    pixels = b"".join(b"\x00" + row for row in rows)  # filter type 0 before each row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels, 9))
        + chunk(b"IEND", b"")
    )


def write_png(metrics_path: Path, png_path: Path) -> str:
    """Draw `png_path` from `metrics_path`; returns a line saying what was done."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    shares = [row["expert_share"] for row in rows if row.get("expert_share")]
    if not shares:
        return f"no {Path(png_path).name}: {metrics_path} holds no per-expert load (a dense model?)"
    width, height, pixels = render(share_columns(shares))
    Path(png_path).write_bytes(encode_png(width, height, pixels))
    return (
        f"wrote {png_path} ({len(shares[0])} layer(s) x {len(shares)} steps; "
        f"colour: 0 dark, 1/E teal, 2/E or more yellow)"
    )
