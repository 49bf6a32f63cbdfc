"""Sample prompts in Kohya's prompt-file format, so files written for sd-scripts work here unchanged.

One prompt a line; options follow ` --`: `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG
scale, `--s` steps, `--ss` sampler. Blank lines and lines starting with `#` are skipped. Defaults are
Kohya's: 512×512, 30 steps, scale 7.5, no negative prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

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
                if size < 64 or size % 8:
                    raise ValueError(f"--{key} {value}: sizes must be multiples of 8 from 64")
                values["width" if key == "w" else "height"] = size
            elif key == "d":
                values["seed"] = int(value)
            elif key == "l":
                values["scale"] = float(value)
            elif key == "s":
                values["steps"] = max(1, min(1000, int(value)))  # Kohya's clamp
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
    return parse_prompts(path.read_text(encoding="utf-8", errors="replace"), path.name, defaults)
