"""Sample prompts in Kohya's prompt-file format, so files written for sd-scripts work here unchanged.

One prompt a line; options follow ` --`: `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG
scale, `--s` steps, `--ss` sampler. Blank lines and lines starting with `#` are skipped. Defaults are
Kohya's: 512×512, 30 steps, scale 7.5, no negative prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

MAX_SIDE = 4096
"""The largest picture side taken: twice SDXL's native size; past it the VAE alone needs tens of GiB."""
MAX_STEPS = 1000
"""Kohya's clamp on `--s`."""
_OPTION = re.compile(r"^(ss|n|w|h|d|l|s)\s+(.*)$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Prompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    """None: derived from the run's seed and the prompt's position, so every epoch uses the same noise."""
    scale: float = 7.5
    steps: int = 30
    sampler: str | None = None


def parse_line(line: str, defaults: Prompt | None = None) -> tuple[Prompt | None, list[str]]:
    """(prompt, problems) for one line; (None, []) for a blank or `#` line. Unknown or malformed options are
    reported and skipped, as Kohya does, rather than failing the run. Options the line leaves out come from
    `defaults` (a command line's --steps, say), else Kohya's."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None, []
    prompt, *options = re.split(r"(?:^|\s+)--", text)
    prompt, values, problems = prompt.strip(), {}, []
    for option in options:
        match = _OPTION.match(option.strip())
        if not match:
            problems.append(f"unknown option --{option.strip()}")
            continue
        key, value = match.group(1).lower(), match.group(2).strip()
        try:
            if key == "n":
                values["negative"] = value
            elif key == "ss":
                values["sampler"] = value
            elif key in ("w", "h"):
                size = int(value)
                if size < 64 or size % 8 or size > MAX_SIDE:
                    raise ValueError(f"--{key} {value}: sizes must be multiples of 8 from 64 to {MAX_SIDE}")
                values["width" if key == "w" else "height"] = size
            elif key == "d":
                values["seed"] = int(value)
            elif key == "l":
                scale = float(value)
                if not math.isfinite(scale):
                    raise ValueError(f"--l {value}: the CFG scale must be a finite number")
                values["scale"] = scale
            elif key == "s":
                steps = int(value)
                values["steps"] = max(1, min(MAX_STEPS, steps))  # Kohya's clamp
                if steps != values["steps"]:
                    problems.append(f"--s {value}: steps are from 1 to {MAX_STEPS}; using {values['steps']}")
        except ValueError as exc:
            problems.append(str(exc) if str(exc).startswith("--") else f"--{key} {value}: not a number")
    if not prompt:
        problems.append("no prompt before the options")
        return None, problems
    return replace(defaults or Prompt(""), prompt=prompt, **values), problems


def parse_prompts(text: str, source: str = "prompts", defaults: Prompt | None = None) -> tuple[list[Prompt], list[str]]:
    """Every prompt of a file, and warnings naming `source:line` for what was skipped."""
    prompts, warnings = [], []
    for number, line in enumerate(text.splitlines(), 1):
        prompt, problems = parse_line(line, defaults)
        warnings += [f"{source}:{number}: {problem}" for problem in problems]
        if prompt is not None:
            prompts.append(prompt)
    return prompts, warnings


def read_prompts(path: Path, defaults: Prompt | None = None) -> tuple[list[Prompt], list[str]]:
    """A prompts file read by the sidecar rule (UTF-8, a mark dropped, UTF-16 recognised): text in another
    encoding is a SidecarError naming the file, never prompts full of replacement characters."""
    from lorasmith.common.sidecar import SidecarError, decode_text

    try:
        text = decode_text(path.read_bytes())
    except SidecarError as exc:
        raise SidecarError(f"prompts file {path} {exc}") from None
    except OSError as exc:
        raise SidecarError(f"prompts file {path} cannot be read: {exc.strerror or exc}") from None
    return parse_prompts(text, path.name, defaults)
