"""The bodies of `lora`'s subcommands: arguments in, files out, a short summary, an exit code."""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

from lorasmith.use.jobs import JobError, expand_loras, plan_jobs

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    return getattr(torch, PRECISIONS[name])


def _warn(lines) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _prompts(args) -> list:
    from lorasmith.common.prompts import Prompt, read_prompts

    defaults = Prompt("", args.negative, args.w, args.h, None, args.cfg, args.steps, None)
    if args.prompts:
        if args.prompt:
            raise JobError("give --prompt or --prompts FILE, not both")
        if not args.prompts.is_file():
            raise JobError(f"--prompts {args.prompts}: no such file")
        from lorasmith.common.sidecar import SidecarError

        try:
            prompts, warnings = read_prompts(args.prompts, defaults)
        except SidecarError as exc:
            raise JobError(f"--prompts: {exc}") from None
        _warn(warnings)
        if not prompts:
            raise JobError(f"--prompts {args.prompts} holds no prompt lines")
        return prompts
    if not args.prompt and not args.tags:
        raise JobError("nothing to draw: give --prompt TEXT or --prompts FILE")
    return [Prompt(args.prompt, args.negative, args.w, args.h, None, args.cfg, args.steps, None)]


def _inits(path: Path | None) -> list[Path] | None:
    from lorasmith.common.layout import iter_images

    if path is None:
        return None
    if path.is_dir():
        found = list(iter_images(path))
        if not found:
            raise JobError(f"--init-image {path}: the folder holds no pictures")
        return found
    if not path.is_file():
        raise JobError(f"--init-image {path}: no such file or folder")
    return [path]


def _with_tags(jobs, tagger_name: str | None, problems: list[str]) -> None:
    """Each init picture's WD14 tags after the prompt, parentheses escaped so emphasis does not eat them."""
    from lorasmith.models.wd14 import DEFAULT_WD14, Wd14Settings, Wd14Tagger
    from lorasmith.common.loading import PictureError, open_picture

    tagger = Wd14Tagger(Wd14Settings(model=tagger_name or DEFAULT_WD14))
    tags: dict[Path, str] = {}
    for job in jobs:
        if job.init not in tags:
            try:
                found = tagger.tag([open_picture(job.init).image])[0]
            except PictureError as exc:
                problems.append(f"{job.init}: {exc}; tagged with nothing")
                found = []
            tags[job.init] = ", ".join(t.replace("(", r"\(").replace(")", r"\)") for t in found)
        job.prompt = replace(job.prompt, prompt=", ".join(p for p in (job.prompt.prompt, tags[job.init]) if p))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _check_prompts(jobs) -> None:
    """Every prompt's emphasis read before any model loads, so a typo on line 40 costs no drawing time."""
    from lorasmith.use.weights import PromptError, parse_attention

    for job in jobs:
        for what, text in (("prompt", job.prompt.prompt), ("negative prompt", job.prompt.negative)):
            try:
                parse_attention(text, what)
            except PromptError as exc:
                raise JobError(f"{exc} ({text[:60]!r})") from None


def _check_sizes(jobs, device: str, dtype) -> None:
    from lorasmith.use.budget import available_bytes, too_big

    width, height = max(((j.prompt.width, j.prompt.height) for j in jobs), key=lambda s: s[0] * s[1])
    problem = too_big(width, height, dtype.itemsize, available_bytes(device))
    if problem:
        raise JobError(problem)


def _check_base(args):
    """The base model's family, read from its configs or tensor shapes before any weight loads. An option that
    cannot apply to it is refused (--clip-skip on SDXL) or, for size conditioning on a base without it, ignored
    with a warning; returns (family, original size, crop) with the ignored ones None."""
    from lorasmith.models.base import inspect_base, resolve_name
    from lorasmith.models.families import family_named

    family = family_named(inspect_base(resolve_name(args.model)[0])[0])
    if args.clip_skip > 1 and family.clip_skip_note:
        raise JobError(f"--clip-skip {args.clip_skip} does not apply to this {family.label} base: "
                       f"{family.clip_skip_note}; leave --clip-skip out")
    size = args.original_size
    crop = None if args.crop_top_left == (0, 0) else args.crop_top_left  # 0,0 is the default: the same names
    if not family.size_conditioned and (size or crop):
        _warn([f"--original-size and --crop-top-left condition SDXL's UNet, and this {family.label} base has no "
               "such input: ignored"])
        size = crop = None
    return family, size, crop


def generate(args) -> int:
    from functools import partial

    from lorasmith.use.generate import Settings, prepare, read_loras
    from lorasmith.use.outputs import writing
    from lorasmith.use.render import Renderer, model_hash, pick_device

    if args.tags and args.init_image is None:
        raise JobError("--tags tags the init pictures: give --init-image too")
    if args.out.exists() and not args.out.is_dir():
        raise JobError(f"--out {args.out} is a file; pictures go into a folder: choose a folder name")
    files = expand_loras(args.lora)
    if args.sweep and not files:
        raise JobError("--sweep compares LoRA files: give at least one --lora")
    folders = args.lora_dir or list(dict.fromkeys([p.parent for p, _ in files] + [Path(".")]))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    jobs = plan_jobs(_prompts(args), [] if args.sweep else files, folders, seed, args.n, _inits(args.init_image),
                     args.strength)
    _check_prompts(jobs)
    family, original_size, crop = _check_base(args)
    problems: list[str] = []
    if args.tags:
        _with_tags(jobs, args.tagger, problems)
    loras = read_loras([p for p, _ in files] + [p for job in jobs for p in job.loras])
    settings = Settings(args.model, args.out, args.sampler, args.clip_skip, args.device, args.precision,
                        args.overwrite, not args.quiet, original_size=original_size, crop=crop)
    device, dtype = pick_device(args.device, args.precision)
    _check_sizes(jobs, device, _dtype("fp32") if family.vae_fp32 else dtype)  # the VAE decode is the peak
    factory = partial(Renderer, args.model, device=device, dtype=dtype, clip_skip=args.clip_skip,
                      family=family.name, original_size=original_size, crop=crop,
                      samplers=sorted({job.prompt.sampler or args.sampler for job in jobs}))
    digest = model_hash(args.model)
    with writing(args.out):
        prepare(jobs, settings)
    return _draw(args, jobs, files, settings, factory, loras, digest, problems)


def _draw(args, jobs, files, settings, factory, loras, digest, problems) -> int:
    from lorasmith.use.generate import contact_sheet, run_jobs, sweep

    if args.sweep:
        if any(job.loras for job in jobs):
            raise JobError("--sweep compares the --lora files: take the <lora:…> tags out of the prompts")
        result = sweep(jobs, list(dict.fromkeys(p for p, _ in files)), args.weights, settings, factory, loras, digest,
                       problems)
        _warn(problems)
        print(f"{len(result.grids)} sweep grid(s) written, {len(result.skipped)} already there, {len(problems)} "
              f"problem(s) ({result.seconds:.1f} s): " + ", ".join(str(p) for p in result.grids + result.skipped))
        return 1 if problems else 0
    result, drawn = run_jobs(jobs, settings, factory, loras, digest, problems)
    _warn(problems)
    sheet = contact_sheet(drawn, settings, f"{Path(args.model.rstrip('/')).name}, {_plural(len(drawn), 'picture')}")
    each = f", {result.seconds / len(result.written):.2f} s each" if result.written else ""
    print(f"{len(result.written)} picture(s) written, {len(result.skipped)} already there (--overwrite redraws), "
          f"{len(problems)} problem(s){each}; contact sheet {sheet}")
    return 1 if problems else 0


def merge(args) -> int:
    from lorasmith.use.generate import read_loras
    from lorasmith.use.lowrank import concatenate, svd_merge
    from lorasmith.use.merge import kept_lines, lora_metadata, merge_checkpoint, write_lora
    from lorasmith.use.outputs import check_file_output, check_folder_output, writing

    files = expand_loras(args.lora)
    inputs = [p for p, _ in files] + ([Path(args.model)] if args.model else [])
    if args.model and args.format == "diffusers":
        check_folder_output(args.out, inputs, args.overwrite)
    else:
        check_file_output(args.out, inputs, args.overwrite)
    read = read_loras([p for p, _ in files])
    loras = [(read[p], w) for p, w in files]
    if args.model:
        if args.rank:
            raise JobError("--rank applies to merging LoRAs into one LoRA; leave out --model for that")
        with writing(args.out):
            path, changed = merge_checkpoint(args.model, loras, args.out, args.format, _dtype(args.save_precision))
        print(f"{len(loras)} LoRA(s) baked into {args.model} ({changed} layers changed): {path}")
        return 0
    if args.out.suffix != ".safetensors":
        raise JobError(f"--out {args.out}: a merged LoRA is a .safetensors file")
    report = []
    if args.rank:
        merged, report = svd_merge(loras, args.out.name, args.rank)
        note = f"SVD merge to rank {args.rank}"
    else:
        merged = concatenate(loras, args.out.name)
        note = "ranks concatenated (exact merge)"
    with writing(args.out):
        write_lora(args.out, merged, lora_metadata(merged, loras, note), _dtype(args.save_precision))
    if report:
        print("\n".join(kept_lines(report)))
    ranks = sorted({m.rank for m in merged.modules.values()})
    print(f"{len(loras)} LoRA(s) merged into {args.out}: {len(merged.modules)} modules, rank "
          f"{ranks[0]}{'–' + str(ranks[-1]) if len(ranks) > 1 else ''} ({note})")
    return 0


def resize(args) -> int:
    from lorasmith.use.generate import read_loras
    from lorasmith.use.lowrank import resize as resize_lora
    from lorasmith.use.lowrank import dylora_unit, truncate
    from lorasmith.use.merge import kept_lines, lora_metadata, write_lora
    from lorasmith.use.outputs import check_file_output, writing

    out = args.out or args.file.with_name(f"{args.file.stem}-r{args.rank}{'d' if args.dynamic else ''}.safetensors")
    check_file_output(out, [args.file], args.overwrite)
    lora = read_loras([args.file])[args.file]
    _check_names(lora)
    top = max(m.rank for m in lora.modules.values())
    if top <= args.rank and not args.dynamic:
        raise JobError(f"{args.file.name} is rank {top} already (no module above {args.rank}): resizing to "
                       f"--rank {args.rank} would only copy it; choose a rank below {top}")
    unit = dylora_unit(lora)
    if unit and not args.dynamic:
        if args.rank % unit:
            raise JobError(f"{args.file.name} is a DyLoRA trained in steps of {unit} ranks: --rank must be a "
                           f"multiple of {unit}")
        resized, note = truncate(lora, args.rank), f"DyLoRA truncated to its first {args.rank} ranks"
        lines = [f"{len(resized.modules)} modules, rank {args.rank}: the first ranks of each, trained to work alone"]
    else:
        resized, report = resize_lora(lora, args.rank, args.dynamic)
        note = (f"resized to rank ≤ {args.rank} keeping {args.dynamic:.0%} of each ΔW (Frobenius)" if args.dynamic
                else f"resized to rank {args.rank}")
        lines = kept_lines(report)
        kept = sum(k.rank_after == k.rank_before for k in report)
        if kept:
            lines.append(f"{_plural(kept, 'module')} of rank {args.rank} or less kept their rank")
    resized.name = out.name
    with writing(out):
        write_lora(out, resized, lora_metadata(resized, [(lora, 1.0)], note), _dtype(args.save_precision))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


def _check_names(lora) -> None:
    """A file whose module names fit no layer of its family's public architecture (the one `info` checks) is
    refused before any SVD: its resized copy would load nowhere either. Shapes are not held against it (a custom
    base's file may share the names), and a file the reference cannot judge is resized unchecked."""
    from lorasmith.use.apply import unknown_names
    from lorasmith.use.info import reference

    table, base, _ = reference(lora)
    unknown = unknown_names(lora, table) if table is not None else []
    if unknown:
        raise JobError(f"{lora.name} does not fit {base}: {len(unknown)} of {len(lora.modules)} modules name no "
                       f"layer in it (e.g. {unknown[0]}); not resized, as the copy would not load either: rename or "
                       "drop those modules first")


def info(args) -> int:
    from lorasmith.lorafile.export import addnet_hashes
    from lorasmith.use.info import base_table, describe, reference
    from lorasmith.lorafile.read import LoraError, read_lora

    model_table = base_table(args.model) if args.model else None
    failed = 0
    for path in args.files:
        try:
            lora = read_lora(path)
        except LoraError as exc:
            print(f"{path.name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if model_table is not None:
            table, base, names = model_table, "this base model", f"checked against {args.model}"
        else:
            table, base, names = reference(lora)
        lines, problems = describe(path, lora, table, addnet_hashes(path.read_bytes())[0], base, names)
        print("\n".join(lines))
        failed += bool(problems)
    return 1 if failed else 0
