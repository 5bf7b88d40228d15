"""expert_load: the trainer's standard-library PNG of expert load decodes and shows the shares."""

import json
import struct
import zlib

from expert_parallel.expert_load import MAX_COLUMNS, colour, write_png


def decode(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, RGB rows) of an 8-bit RGB, unfiltered, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        at += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour_type, interlace) == (8, 2, 0)
    pixels = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(pixels) == height * stride
    rows = [pixels[i * stride : (i + 1) * stride] for i in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type 0
    return width, height, [row[1:] for row in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][3 * x : 3 * x + 3])


def write_metrics(path, shares_per_step) -> None:
    lines = [json.dumps({"step": i + 1, "expert_share": s}) for i, s in enumerate(shares_per_step)]
    path.write_text("\n".join(lines) + "\n")


def test_cells_separator_and_size(tmp_path):
    # 2 layers x 4 experts x 3 steps. Layer 0, step 1: expert 0 takes everything; layer 1 is balanced.
    steps = [
        [[1.0, 0.0, 0.0, 0.0], [0.25] * 4],
        [[0.5, 0.5, 0.0, 0.0], [0.25] * 4],
        [[0.25] * 4, [0.25] * 4],
    ]
    write_metrics(tmp_path / "metrics.jsonl", steps)
    message = write_png(tmp_path / "metrics.jsonl", tmp_path / "expert_load.png")
    assert message.startswith(f"wrote {tmp_path / 'expert_load.png'}")
    width, height, rows = decode((tmp_path / "expert_load.png").read_bytes())
    # 3 columns of 16 pixels; 4 experts of 12 pixels per layer, a 1-pixel line between the 2 layers.
    assert (width, height) == (3 * 16, 2 * 4 * 12 + 1)
    one, zero, balanced = pixel(rows, 0, 0), pixel(rows, 0, 12), pixel(rows, 40, 0)
    assert one != zero and one == colour(1.0) and zero == colour(0.0) and balanced == colour(0.5)
    assert pixel(rows, 15, 11) == one and pixel(rows, 16, 0) == colour(1.0)  # 0.5 = 2/E: the top
    assert rows[48] == bytes([255, 255, 255]) * width  # the separator
    assert {pixel(rows, x, y) for x in range(width) for y in range(49, height)} == {colour(0.5)}


def test_many_steps_are_binned_and_dense_runs_write_nothing(tmp_path):
    steps = [[[1.0, 0.0]] if i % 2 else [[0.0, 1.0]] for i in range(2 * MAX_COLUMNS + 2)]
    write_metrics(tmp_path / "metrics.jsonl", steps)
    write_png(tmp_path / "metrics.jsonl", tmp_path / "expert_load.png")
    width, height, rows = decode((tmp_path / "expert_load.png").read_bytes())
    assert width <= MAX_COLUMNS and height == 2 * 12
    assert pixel(rows, 0, 0) == colour((0.0 + 1.0 + 0.0) / 3 / 1.0)  # bins of 3 steps; 2/E = 1

    (tmp_path / "dense.jsonl").write_text(json.dumps({"step": 1, "expert_share": []}) + "\n")
    message = write_png(tmp_path / "dense.jsonl", tmp_path / "dense.png")
    assert "no dense.png" in message and not (tmp_path / "dense.png").exists()


def test_colour_map_runs_dark_to_bright():
    brightness = [sum(colour(v / 10)) for v in range(11)]
    assert brightness == sorted(brightness) and colour(-1.0) == colour(0.0) and colour(3.0) == colour(1.0)
