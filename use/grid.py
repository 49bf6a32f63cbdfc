"""Labelled grids: the contact sheet of a `generate` call and the LoRA × weight sweep."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from lorasmith.models.sampling import fit_text, label_font

PAD, LINE = 6, 16
MAX_LABEL = 220


def _margins(row_labels: list[str], column_labels: list[str]) -> tuple[int, int]:
    """The row-label column's width and the header's height."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # A label is cut at MAX_LABEL characters before it is measured: the column is at most 220 px wide anyway.
    label_w = min(220, max([math.ceil(probe.textlength(t[:MAX_LABEL], font=label_font(13))) + 2 * PAD
                            for t in row_labels] + [0]))
    return label_w, LINE + 2 * PAD + (LINE + PAD if any(column_labels) else 0)


def table_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str], title: str,
               tile: int = 256) -> Image.Image:
    """Cells scaled to `tile` × `tile` (aspect kept, centred), column labels on top, row labels on the left.
    Every cell has the same box, so a missing picture (None) leaves a gap instead of shifting the table."""
    font = label_font(13)
    label_w, top = _margins(row_labels, column_labels)
    columns = max(len(r) for r in rows) if rows else 0
    width = label_w + columns * (tile + PAD) + PAD
    grid = Image.new("RGB", (max(width, 200), top + len(rows) * (tile + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((PAD, PAD), fit_text(draw, title, grid.width - 2 * PAD, font), fill="black", font=font)
    for c, label in enumerate(column_labels):
        draw.text((label_w + PAD + c * (tile + PAD), LINE + 2 * PAD), fit_text(draw, label, tile, font), fill="black",
                  font=font)
    for r, row in enumerate(rows):
        y = top + r * (tile + PAD)
        if r < len(row_labels):
            draw.text((PAD, y + tile // 2 - LINE // 2), fit_text(draw, row_labels[r], label_w - 2 * PAD, font),
                      fill="black", font=font)
        for c, image in enumerate(row):
            if image is None:
                continue
            scale = tile / max(image.size)
            cell = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                Image.Resampling.LANCZOS)
            x = label_w + PAD + c * (tile + PAD)
            grid.paste(cell, (x + (tile - cell.width) // 2, y + (tile - cell.height) // 2))
    return grid


def cell_box(row: int, column: int, row_labels: list[str], column_labels: list[str], tile: int = 256
             ) -> tuple[int, int, int, int]:
    """Where `table_grid` puts a cell (left, top, right, bottom): for tests and for cutting a grid apart."""
    label_w, top = _margins(row_labels, column_labels)
    x, y = label_w + PAD + column * (tile + PAD), top + row * (tile + PAD)
    return x, y, x + tile, y + tile
