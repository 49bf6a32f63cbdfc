"""What `lora generate` will draw, worked out before any model loads: LoRA arguments and A1111's in-prompt
`<lora:NAME:WEIGHT>` tags resolved to files, one job per picture, stable output names.

Names carry a short hash of everything that shapes the picture, so a second run with the same settings
finds its pictures done and draws only the missing ones, while changed settings never overwrite.
"""

from __future__ import annotations

import glob
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith.common.prompts import Prompt

LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
SWEEP_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_WEIGHT = 100.0
"""The largest LoRA weight taken (either sign): far past any useful strength (sliders go to ±10), and well short
of the values that overflow a layer into a NaN picture."""
_NUMBER = r"[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf|infinity)"


class JobError(ValueError):
    """A LoRA argument or tag that names no file, or a weight that is not a number."""


def check_weight(value: float, what: str) -> float:
    """`value` when it is a finite LoRA weight within ±MAX_WEIGHT; else a JobError naming it and `what` it came
    from, so a typo never draws a NaN picture."""
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise JobError(f"{what}: weight {value:g} is out of range: LoRA weights are numbers between {-MAX_WEIGHT:g} "
                       f"and {MAX_WEIGHT:g} (1 is full strength)")
    return value


def _weight(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise JobError(f"{what}: weight {text!r} is not a number (write e.g. 0.8 or -0.5)") from None
    return check_weight(value, what)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]` → (file or glob pattern, weight); the weight may be negative or above 1, within
    ±MAX_WEIGHT."""
    path, sep, weight = text.rpartition(":")
    if sep and path and re.fullmatch(_NUMBER, weight.strip(), re.IGNORECASE):
        return path, check_weight(float(weight), f"--lora {text}")
    return text, 1.0


def expand_loras(args: list[str]) -> list[tuple[Path, float]]:
    """Every `--lora` argument as files; a glob (`out/clay-*.safetensors`) gives its matches in name order."""
    found = []
    for arg in args:
        pattern, weight = parse_lora_arg(arg)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise JobError(f"--lora {arg}: no file matches {pattern}")
            found += [(Path(m), weight) for m in matches]
        else:
            found.append((Path(pattern), weight))
    return found


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME:W>` tags, and the tags as (NAME, W); W defaults to 1 as in A1111."""
    tags = [(m.group(2).strip(), _weight(m.group(3), m.group(0)) if m.group(3) else 1.0)
            for m in LORA_TAG.finditer(prompt)]
    text = LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,"), tags


def _within(path: Path, folder: Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `folder` (resolved too)."""
    return folder.resolve() in path.resolve().parents


def resolve_tag(name: str, folders: list[Path]) -> Path:
    """A tag's NAME as a file in the LoRA folders: NAME itself, NAME.safetensors, or a file of that stem below.
    A prompt is text from anywhere (a pasted civitai prompt, a shared prompts file), so a NAME never leaves
    its folder: no absolute path, no `..`, and no symlink pointing out."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise JobError(f"<lora:{name}> in the prompt points outside the LoRA folders: a tag names a file inside "
                       "--lora-dir, e.g. <lora:clay:0.8> or <lora:styles/clay:0.8>")
    for folder in folders:
        candidates = [folder / name, folder / f"{name}.safetensors"]
        candidates += sorted(folder.rglob(f"{glob.escape(name)}.safetensors")) if folder.is_dir() else []
        for candidate in candidates:
            if candidate.is_file():
                if not _within(candidate, folder):
                    raise JobError(f"<lora:{name}> in the prompt resolves to {candidate.resolve()}, outside "
                                   f"{folder}: tags load files inside the LoRA folders only")
                return candidate
    where = ", ".join(str(f) for f in folders) or "no folder"
    raise JobError(f"<lora:{name}> in the prompt names no file: looked for {name}.safetensors in {where} "
                   "(point --lora-dir at the folder that holds it)")


@dataclass
class Job:
    prompt: Prompt
    """Its text without `<lora:…>` tags; the tags are in `loras`."""
    seed: int
    loras: dict[Path, float] = field(default_factory=dict)
    init: Path | None = None
    strength: float = 1.0
    name: str = ""
    """The output file's name."""


def settings_key(job: Job, model: str, sampler: str, clip_skip: int) -> str:
    """A short hash of everything that shapes the picture: equal keys, equal pictures."""
    p = job.prompt
    parts = [model, p.prompt, p.negative, p.width, p.height, p.scale, p.steps, p.sampler or sampler, clip_skip,
             job.seed, job.strength, str(job.init or ""), sorted((str(k), v) for k, v in job.loras.items())]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


def plan_jobs(prompts: list[Prompt], loras: list[tuple[Path, float]], folders: list[Path], seed: int, count: int,
              inits: list[Path] | None = None, strength: float = 1.0) -> list[Job]:
    """One job per prompt × seed (× init picture). Prompt tags add to, or override, the command line's LoRAs."""
    jobs = []
    for prompt in prompts:
        text, tags = split_lora_tags(prompt.prompt)
        chosen = dict(loras)
        chosen.update({resolve_tag(name, folders): weight for name, weight in tags})
        base = prompt.seed if prompt.seed is not None else seed
        for init in inits or [None]:
            for k in range(count):
                jobs.append(Job(Prompt(**{**prompt.__dict__, "prompt": text}), base + k, chosen, init, strength))
    return jobs


def name_jobs(jobs: list[Job], model: str, sampler: str, clip_skip: int) -> None:
    """Pictures from an init picture keep its name; others are `<prompt #>-<seed>-<settings hash>.png`."""
    numbers: dict[str, int] = {}
    for job in jobs:
        key = settings_key(job, model, sampler, clip_skip)
        if job.init is not None:
            job.name = f"{job.init.stem}-{job.seed}-{key}.png"
        else:
            index = numbers.setdefault(job.prompt.prompt, len(numbers))
            job.name = f"{index:03d}-{job.seed}-{key}.png"


def fit_size(size: tuple[int, int], width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """A picture's aspect ratio at about width × height pixels, sides multiples of `multiple`: an init picture
    is redrawn at the size asked for without being squashed."""
    w, h = size
    scale = (width * height / (w * h)) ** 0.5
    return (max(multiple, round(w * scale / multiple) * multiple), max(multiple, round(h * scale / multiple) * multiple))
