"""`lora generate`: jobs → pictures with their parameters → a contact sheet, or the LoRA × weight sweep."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorasmith.use.jobs import Job, fit_size, name_jobs, settings_key
from lorasmith.use.outputs import writing
from lorasmith.use.pnginfo import A1111_SAMPLERS, parameters_text, save_png


@dataclass
class Settings:
    model: str
    out: Path
    sampler: str = "euler_a"
    clip_skip: int = 1
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    progress: bool = True
    tile: int = 256
    original_size: tuple[int, int] | None = None
    """--original-size (width, height) for size-conditioned bases (SDXL); None: each picture's own size."""
    crop: tuple[int, int] | None = None
    """--crop-top-left (top, left) for size-conditioned bases; None: 0,0."""


@dataclass
class Result:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def lora_hash(lora) -> str:
    """A1111's short LoRA hash: the first 12 digits of the additional-networks hash over the tensor bytes."""
    return lora.metadata.get("sshs_model_hash", "")[:12]


def adapter_names(files: list[Path]) -> dict[Path, str]:
    return {path: f"lora{i}" for i, path in enumerate(dict.fromkeys(files))}


def read_loras(files) -> dict[Path, object]:
    """Each file once, read and checked for format before any model loads."""
    from lorasmith.lorafile.export import addnet_hashes
    from lorasmith.lorafile.read import check_lora, read_lora

    loras = {}
    for path in dict.fromkeys(files):
        lora = check_lora(read_lora(path))
        if "sshs_model_hash" not in lora.metadata:
            lora.metadata["sshs_model_hash"] = addnet_hashes(Path(path).read_bytes())[0]
        loras[path] = lora
    return loras


def _parameters(job: Job, settings: Settings, loras: dict, model_hash: str) -> str:
    p = job.prompt
    used = [(loras[path].stem, weight, lora_hash(loras[path])) for path, weight in job.loras.items()]
    values = {"Steps": p.steps, "Sampler": A1111_SAMPLERS.get(p.sampler or settings.sampler, p.sampler or settings.sampler),
              "CFG scale": f"{p.scale:g}", "Seed": job.seed, "Size": f"{p.width}x{p.height}",
              "Model hash": model_hash, "Model": Path(settings.model.rstrip("/")).name or settings.model,
              "Denoising strength": f"{job.strength:g}" if job.init is not None else None,
              "Clip skip": settings.clip_skip if settings.clip_skip > 1 else None,
              "Original size": "x".join(map(str, settings.original_size)) if settings.original_size else None,
              "Crop top left": ",".join(map(str, settings.crop)) if settings.crop else None,
              "Version": "lorasmith"}
    return parameters_text(p.prompt, p.negative, values, used)


def _loras_text(job: Job, loras: dict) -> str:
    return ", ".join(f"{loras[p].stem}:{w:g}" for p, w in job.loras.items()) or "no LoRA"


def _init_picture(job: Job):
    from lorasmith.common.loading import open_picture  # one decoder for every stage: EXIF turns, 16-bit, CMYK

    image = open_picture(job.init).image
    width, height = fit_size(image.size, job.prompt.width, job.prompt.height)
    job.prompt = replace(job.prompt, width=width, height=height)
    return image


def run_jobs(jobs: list[Job], settings: Settings, renderer_factory, loras: dict, model_hash: str,
             problems: list[str]) -> tuple[Result, list]:
    """Draw every job not already on disk; (result, [(job, picture or None)]) for the contact sheet.
    A picture that fails (an unreadable init picture) is reported and the rest go on."""
    from PIL import Image
    from tqdm import tqdm

    from lorasmith.common.loading import PictureError
    from lorasmith.models.sampling import NonFinitePicture

    result, drawn, renderer = Result(), [], None
    names = adapter_names(list(loras))
    started = time.perf_counter()
    for job in tqdm(jobs, desc="generate", unit="picture", disable=not settings.progress):
        target = settings.out / job.name
        if target.exists() and not settings.overwrite:
            result.skipped.append(target)
            drawn.append((job, Image.open(target).convert("RGB")))
            continue
        try:
            init = _init_picture(job) if job.init is not None else None
        except PictureError as exc:
            problems.append(f"{job.init}: {exc}; skipped")
            drawn.append((job, None))
            continue
        renderer = renderer or renderer_factory({names[p]: loras[p] for p in loras})
        weights = {names[path]: w for path, w in job.loras.items()}
        try:
            picture = renderer.draw(job.prompt, job.seed, weights, settings.sampler, init, job.strength)
        except NonFinitePicture as exc:
            problems.append(f"{job.name} (seed {job.seed}, {_loras_text(job, loras)}): {exc}; not saved")
            drawn.append((job, None))
            continue
        with writing(target):
            save_png(target, picture, _parameters(job, settings, loras, model_hash))
        result.written.append(target)
        drawn.append((job, picture))
    result.seconds = time.perf_counter() - started
    return result, drawn


def contact_sheet(drawn: list, settings: Settings, title: str) -> Path:
    """One row per prompt (or init picture), one column per seed."""
    from lorasmith.common.files import atomic_writer
    from lorasmith.use.grid import table_grid

    rows: dict[str, list] = {}
    for job, picture in drawn:
        label = job.init.name if job.init is not None else job.prompt.prompt
        rows.setdefault(label, []).append(picture)
    tile = max(64, min(settings.tile, 8192 // max(1, len(rows))))  # 200 init pictures still make a sheet one can open
    grid = table_grid(list(rows.values()), list(rows), [], title, tile)
    path = settings.out / f"sheet-{time.strftime('%Y%m%d-%H%M%S')}.png"
    with writing(path), atomic_writer(path) as handle:
        grid.save(handle, format="PNG")
    return path


def sweep(jobs: list[Job], files: list[Path], weights: list[float], settings: Settings, renderer_factory,
          loras: dict, model_hash: str, problems: list[str]) -> Result:
    """Per prompt and seed (and init picture), one grid: rows = LoRA files, columns = weights, the same seed in
    every cell. The weight-0 column is the base model, drawn once and shown in every row. A grid already on
    disk for the same settings, files and weights is kept."""
    import hashlib

    from tqdm import tqdm

    from lorasmith.common.loading import PictureError
    from lorasmith.models.sampling import NonFinitePicture

    names = adapter_names(files)
    renderer = None
    result, started = Result(), time.perf_counter()
    bar = tqdm(total=len(jobs), desc="sweep", unit="grid", disable=not settings.progress)
    what = hashlib.sha256(repr([[loras[p].metadata.get("sshs_model_hash") for p in files], weights]).encode())
    for job in jobs:
        bar.update()
        key = settings_key(job, _key_model(settings), settings.sampler, settings.clip_skip)
        path = settings.out / f"sweep-{job.seed}-{key}{what.hexdigest()[:4]}.png"
        if path.exists() and not settings.overwrite:
            result.skipped.append(path)
            continue
        try:
            init = _init_picture(job) if job.init is not None else None
        except PictureError as exc:
            problems.append(f"{job.init}: {exc}; skipped")
            continue
        renderer = renderer or renderer_factory({names[p]: loras[p] for p in files})
        rows, base = [], None
        for file in files:
            row = []
            for weight in weights:
                try:
                    if weight == 0 and base is None:
                        base = renderer.draw(job.prompt, job.seed, {}, settings.sampler, init, job.strength)
                    row.append(base if weight == 0 else renderer.draw(job.prompt, job.seed, {names[file]: weight},
                                                                      settings.sampler, init, job.strength))
                except NonFinitePicture as exc:
                    problems.append(f"sweep cell {loras[file].stem} at weight {weight:g} (seed {job.seed}): {exc}; "
                                    "left empty")
                    row.append(None)
            rows.append(row)
        with writing(path):
            result.grids.append(save_png(path, _sweep_grid(job, rows, [loras[p] for p in files], weights, settings),
                                         _sweep_parameters(job, [loras[p] for p in files], weights, model_hash)))
    bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _sweep_grid(job: Job, rows: list, loras: list, weights: list[float], settings: Settings):
    from lorasmith.use.grid import table_grid

    title = f"{job.init.name + ': ' if job.init else ''}{job.prompt.prompt}  (seed {job.seed}, {job.prompt.steps} " \
            f"steps, CFG {job.prompt.scale:g})"
    return table_grid(rows, [lora.stem for lora in loras], [f"weight {w:g}" for w in weights], title, settings.tile)


def _sweep_parameters(job: Job, loras: list, weights: list[float], model_hash: str) -> str:
    return parameters_text(job.prompt.prompt, job.prompt.negative,
                           {"Steps": job.prompt.steps, "Seed": job.seed, "Model hash": model_hash,
                            "Sweep weights": " ".join(f"{w:g}" for w in weights)},
                           [(lora.stem, 1.0, lora_hash(lora)) for lora in loras])


def _key_model(settings: Settings) -> str:
    """The model as the settings hash reads it, followed by the size conditioning when one was asked for: another
    original size or crop is another picture, so another file name; without them names stay as they were."""
    extra = [f"{what} {value}" for what, value in (("original size", settings.original_size), ("crop", settings.crop))
             if value is not None]
    return " | ".join([settings.model, *extra])


def prepare(jobs: list[Job], settings: Settings) -> None:
    name_jobs(jobs, _key_model(settings), settings.sampler, settings.clip_skip)
    settings.out.mkdir(parents=True, exist_ok=True)
