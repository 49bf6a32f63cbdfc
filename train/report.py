"""`<name>.report.html`: one self-contained page to judge a run and pick an epoch, with nothing else open.

Images are inlined as data URIs and the curves are inline SVG, so the file can be mailed, copied off a
rented machine or opened offline. Rendering is pure (data in, HTML out); only `image_uri` reads a file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

MAX_POINTS = 1500
"""Raw-loss points drawn at most; longer runs are thinned evenly (the moving average uses every step)."""


@dataclass
class ReportData:
    title: str
    status: str
    config_toml: str
    plan_lines: list[str]
    dataset_lines: list[str]
    loss: list[list]
    """[step, epoch, loss, lr] rows."""
    validation: list[list]
    """[step, epoch, validation loss] rows."""
    total_steps: int
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[tuple[str, int]] = field(default_factory=list)
    """(file name, bytes)."""
    grids: list[tuple[str, int, str]] = field(default_factory=list)
    """(label, epoch, data URI) per sampling event."""
    epoch_files: dict[int, str] = field(default_factory=dict)
    """epoch → the LoRA file saved at its end."""
    band: tuple[float, float] | None = None
    """The base family's healthy loss band (family.ModelFamily.healthy_band); None draws and marks nothing."""
    band_family: str = ""
    """Whose guides the band comes from, e.g. "SD1.x"."""


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), one output per input."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def average_window(steps: int) -> int:
    """About a twentieth of the run, between 5 and 100 steps: smooth enough to read, quick to react."""
    return max(5, min(100, steps // 20 or 5))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) or 1.0
    raw = span / count
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 2.5, 5, 10) if m * unit >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def curve_svg(loss: list[list], validation: list[list], total_steps: int, band: tuple[float, float] | None = None,
              band_family: str = "", width=860, height=320) -> str:
    """Training loss (thin), its moving average (bold), validation loss (dots), the healthy band when there
    is one, epochs."""
    left, right, top, bottom = 56, 16, 16, 40
    steps = [row[0] for row in loss]
    values = [row[2] for row in loss]
    finite = sorted(v for v in values + [row[2] for row in validation] if math.isfinite(v))
    high = max(band[1] * 1.25 if band else 0.0, finite[int(0.98 * (len(finite) - 1))] * 1.1 if finite else 0.0,
               *(row[2] * 1.05 for row in validation if math.isfinite(row[2]))) or 1.0
    xmax = max(total_steps, steps[-1] if steps else 1, 1)

    def x(step: float) -> float:
        return left + (width - left - right) * step / xmax

    def y(value: float) -> float:
        return top + (height - top - bottom) * (1 - min(value, high) / high)

    parts = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="loss curve">']
    if band:
        parts += [f'<rect class="band" x="{left}" y="{y(band[1]):.1f}" width="{width - left - right}" '
                  f'height="{y(band[0]) - y(band[1]):.1f}" fill="#2e9d4f" fill-opacity="0.15"/>',
                  f'<text x="{width - right - 4}" y="{y(band[1]) - 4:.1f}" text-anchor="end" font-size="11" '
                  f'fill="#2e7d32">healthy for {html.escape(band_family)}: {band[0]:.2f}–{band[1]:.2f}</text>']
    for tick in _ticks(0, high):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11">{tick:g}</text>')
    ends: dict[int, int] = {}
    for step, epoch, *_ in loss:
        ends[epoch] = step
    for epoch, step in sorted(ends.items()):
        parts.append(f'<line x1="{x(step):.1f}" x2="{x(step):.1f}" y1="{top}" y2="{height - bottom}" '
                     f'stroke="#bbb" stroke-dasharray="3 3"/><text x="{x(step) - 3:.1f}" y="{top + 10}" '
                     f'text-anchor="end" font-size="10" fill="#777">e{epoch}</text>')
    for tick in _ticks(0, xmax, 8):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">'
                     f'{tick:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" font-size="11">'
                 f'optimizer step (of {total_steps}); dashed lines end epochs (e1, e2, …)</text>')
    if loss:
        stride = max(1, math.ceil(len(loss) / MAX_POINTS))
        raw = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in list(zip(steps, values))[::stride] if math.isfinite(v))
        smooth = moving_average([v if math.isfinite(v) else 0.0 for v in values], average_window(len(values)))
        avg = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in list(zip(steps, smooth))[::stride])
        parts.append(f'<polyline class="loss" points="{raw}" fill="none" stroke="#9db4d8" stroke-width="1"/>')
        parts.append(f'<polyline class="average" points="{avg}" fill="none" stroke="#1f4e9c" stroke-width="2.5"/>')
    if validation:
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, _, v in validation)
        parts.append(f'<polyline class="validation" points="{pts}" fill="none" stroke="#d9731a" stroke-width="2"/>')
        parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="#d9731a"><title>step {s}: {v:.4f}'
                  f'</title></circle>' for s, _, v in validation]
    parts.append("</svg>")
    return "".join(parts)


def image_uri(path: Path, height: int = 300) -> str:
    """A picture as a JPEG data URI at most `height` pixels tall, to keep the page light."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.height > height:
            image = image.resize((round(image.width * height / image.height), height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _epoch_rows(data: ReportData) -> list[str]:
    by_epoch: dict[int, list[float]] = {}
    for _, epoch, value, _ in data.loss:
        by_epoch.setdefault(epoch, []).append(value)
    val = {epoch: value for _, epoch, value in data.validation}
    rows = []
    for epoch, values in sorted(by_epoch.items()):
        mean = sum(values) / len(values)
        inside = data.band is not None and data.band[0] <= mean <= data.band[1]
        v = val.get(epoch)
        rows.append(f'<tr class="{"in-band" if inside else ""}"><td>{epoch}</td><td>{mean:.4f}</td>'
                    f'<td>{"" if v is None else f"{v:.4f}"}</td>'
                    f'<td>{html.escape(data.epoch_files.get(epoch, ""))}</td></tr>')
    return rows


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.status{font-weight:600}table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left}tr.in-band td{background:#e3f4e6}.grids{display:flex;gap:14px;overflow-x:auto;
padding-bottom:8px}figure{margin:0}figcaption{font-size:12px;color:#555}pre{background:#f6f6f6;padding:10px;
overflow-x:auto;font-size:12px}.legend span{margin-right:16px}"""


def render(data: ReportData) -> str:
    e = html.escape
    timings = "".join(f"<tr><td>{e(k)}</td><td>{v:.1f} s</td></tr>" for k, v in data.timings.items())
    outputs = "".join(f"<tr><td>{e(name)}</td><td>{size / 2**20:.2f} MiB</td></tr>" for name, size in data.outputs)
    grids = "".join(f'<figure><img alt="samples {e(label)}" src="{uri}"><figcaption>{e(label)}</figcaption></figure>'
                    for label, _, uri in data.grids) or "<p>No samples: set [sample] sample_prompts in the preset.</p>"
    last = data.loss[-1][2] if data.loss else float("nan")
    recent = [row[2] for row in data.loss[-average_window(len(data.loss)):]]
    summary = (f"{len(data.loss)} of {data.total_steps} steps; loss (moving average) "
               f"{sum(recent) / max(1, len(recent)):.4f}, last {last:.4f}")
    if data.validation:
        summary += f"; validation {data.validation[-1][2]:.4f}"
    band, source = data.band, e(data.band_family)
    legend = (f'\n<span style="color:#2e7d32">▮ {band[0]:.2f}–{band[1]:.2f}: the band {source} LoRA guides call '
              'healthy</span>' if band else "")
    green = ("Green rows: the epoch's mean loss lies in the healthy band. " if band else
             "No healthy loss band is published for this base, so no epoch is marked. ")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(data.title)}</title><style>{STYLE}</style></head><body>
<h1>{e(data.title)}</h1>
<p class="status">{e(data.status)}</p>
<p>{e(summary)}</p>
<h2>Loss</h2>
<p class="legend"><span style="color:#9db4d8">━ training loss per step</span>
<span style="color:#1f4e9c">━ moving average ({average_window(len(data.loss))} steps)</span>
<span style="color:#d9731a">● validation loss (held-out pictures, fixed noise and timesteps)</span>{legend}</p>
{curve_svg(data.loss, data.validation, data.total_steps, band, data.band_family)}
<h2>Epochs</h2>
<p>{green}A validation loss that rises while the training loss falls means the LoRA is memorising its
pictures: pick an earlier epoch.</p>
<table><tr><th>epoch</th><th>mean loss</th><th>validation loss</th><th>LoRA file</th></tr>
{"".join(_epoch_rows(data))}</table>
<h2>Samples</h2>
<div class="grids">{grids}</div>
<h2>Outputs</h2>
<table>{outputs}</table>
<h2>Timings</h2>
<table>{timings}</table>
<h2>Dataset and plan</h2>
<pre>{e(chr(10).join(data.dataset_lines + [""] + data.plan_lines))}</pre>
<h2>Resolved preset</h2>
<pre>{e(data.config_toml)}</pre>
</body></html>
"""
