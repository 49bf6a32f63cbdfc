"""LoRA files in the formats users bring, read into one form: Kohya module names, down/up/alpha per module.
LyCORIS' LoHa and LoKr modules become their exact down/up factors (lorafile/lycoris.py).

lorasmith and Kohya's sd-scripts write `lora_unet_…`/`lora_te_…` with `.lora_down`/`.lora_up`/`.alpha`;
diffusers and peft write `unet.<module path>.lora_A/.lora_B` with alpha in `lora_adapter_metadata` (or
none: alpha = rank). Everything downstream — binding to a model, merging, resizing, inspecting — works on
the Kohya names, so a file's format matters only here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorasmith.lorafile.export import text_key
# The in-memory form comes with its reader: whoever reads a file checks, binds or writes what it read.
from lorasmith.lorafile.lora import (FAMILY_BY_CONTEXT, Lora, LoraError, Module, _shape, check_lora,  # noqa: F401
                                     family_hint, kohya_tensors)
from lorasmith.lorafile.lycoris import LOHA, LOKR, lycoris_missing, lycoris_module

LYCORIS_MARKS = {"hada_t1": "LoHa with Tucker convolutions (hada_t1)", "lokr_t2": "LoKr with Tucker convolutions "
                 "(lokr_t2)", "lora_mid": "LoCon with Tucker (lora_mid)", "dora_scale": "DoRA", "oft_blocks": "OFT",
                 "diff": "full-difference (LyCORIS 'full')"}
"""Tensor names of adapter types this reader does not turn into down/up pairs, for the refusal's wording."""
_KOHYA = re.compile(r"^(lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha|"
                    r"hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$")
_PEFT = re.compile(r"^(unet|transformer|text_encoder(?:_2)?)\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(r"^(unet|transformer|text_encoder(?:_2)?)\.(.+)\.alpha$")
_TE_PREFIX = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def _scalar(tensor, name: str, key: str) -> float:
    """An `.alpha` tensor as its one number; a LoraError when it holds more (or none)."""
    if tensor.numel() != 1:
        raise LoraError(f"{name}: {key} holds {tensor.numel()} values ({_shape(tensor)}); an alpha is one number")
    return float(tensor.item())


def _te_kohya(prefix: str, path: str) -> str:
    key = text_key(path)
    return key.replace("lora_te_", prefix + "_", 1)


def _canonical(key: str) -> str:
    """Kohya names some writers shorten: `lora_te_encoder_…` (no `text_model_`) is the same layer."""
    return re.sub(r"^(lora_te\d?)_encoder_layers_", r"\1_text_model_encoder_layers_", key)


def _peft_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """Per component, diffusers' saved LoraConfig fields (`lora_alpha`, `alpha_pattern`), when present."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _from_peft(tensors: dict, metadata: dict[str, str], name: str) -> dict[str, Module]:
    configs, pairs, alphas = _peft_alphas(metadata), {}, {}
    for key, tensor in tensors.items():
        if match := _PEFT.match(key):
            component, path, which = match.groups()
            pairs.setdefault((component, path), {})[which] = tensor
        elif match := _PEFT_ALPHA.match(key):
            alphas[match.groups()] = _scalar(tensor, name, key)
        else:
            raise LoraError(f"{name} holds {key!r}, which is neither a LoRA down/up weight nor an alpha")
    modules = {}
    for (component, path), pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise LoraError(f"{name}: {component}.{path} has only {', '.join(pair)}; a LoRA needs both A and B")
        config = configs.get(component, {})
        pattern = config.get("alpha_pattern") or {}
        alpha = alphas.get((component, path), next((a for p, a in pattern.items() if path.endswith(p)),
                                                   config.get("lora_alpha", pair["lora_A"].shape[0])))
        if component == "transformer":
            modules[path] = Module(pair["lora_A"], pair["lora_B"], float(alpha))
            continue
        try:
            key = "lora_unet_" + path.replace(".", "_") if component == "unet" else _te_kohya(_TE_PREFIX[component], path)
        except ValueError:
            raise LoraError(f"{name}: no known text-encoder layer is called {path!r}") from None
        modules[key] = Module(pair["lora_A"], pair["lora_B"], float(alpha))
    return _flux_kohya(modules, name)


def _flux_kohya(modules: dict[str, Module], name: str) -> dict[str, Module]:
    """A diffusers-named Flux transformer's modules (ai-toolkit's files) under Kohya's names, the parts of each
    fused BFL layer stacked as lorasmith writes them (lorafile/export.py `stacked`). A part the file lacks is a
    zero rank-1 module: q, k and v are as wide as the block, the MLP's input four times that (Flux's mlp_ratio)."""
    import torch

    from lorasmith.lorafile.export import stacked
    from lorasmith.models.family_flux import DOUBLE, SINGLE, kohya_part

    flux = {path: module for path, module in modules.items() if not path.startswith("lora_")}
    out = {path: module for path, module in modules.items() if path.startswith("lora_")}
    groups: dict[str, dict[int, Module]] = {}
    for path, module in flux.items():
        named = kohya_part(path)
        if named is None:
            raise LoraError(f"{name}: no Flux block layer Kohya names is called {path!r}")
        groups.setdefault(named[0], {})[named[1]] = module
    for key, parts in groups.items():
        count = len({part for table in (DOUBLE, SINGLE) for m, part in table.values() if key.endswith("_" + m)})
        if count == 1:
            out[key] = parts[0]
            continue
        width = next(iter(parts.values())).down.shape[1]
        dicts = []
        for i in range(count):
            module = parts.get(i)
            if module is None:
                rows = 4 * width if i == 3 else width
                module = Module(torch.zeros(1, width), torch.zeros(rows, 1), 1.0)
            dicts.append({"lora_down.weight": module.down, "lora_up.weight": module.up,
                          "alpha": torch.tensor(module.alpha)})
        merged = stacked(dicts, key)
        out[key] = Module(merged["lora_down.weight"], merged["lora_up.weight"], float(merged["alpha"]))
    return out


def _from_kohya(tensors: dict, name: str) -> dict[str, Module]:
    parts: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = _KOHYA.match(key)
        if not match:
            raise LoraError(f"{name} holds {key!r}, which is not a Kohya LoRA key (<module>.lora_down.weight, "
                            ".lora_up.weight or .alpha)")
        parts.setdefault(_canonical(match.group(1)), {})[match.group(2)] = tensor
    modules = {}
    for key, part in parts.items():
        if any(tensor in part for tensor in (*LOHA, *LOKR)):
            missing = lycoris_missing(part)
            if missing:
                raise LoraError(f"{name}: {key} lacks its {missing}; the file is incomplete")
            if "alpha" in part:
                _scalar(part["alpha"], name, f"{key}.alpha")
            try:
                modules[key] = lycoris_module(key, part)
            except RuntimeError:  # factors whose shapes do not multiply
                shapes = ", ".join(f"{k} {_shape(v)}" for k, v in sorted(part.items()) if k != "alpha")
                raise LoraError(f"{name}: {key} has factors whose shapes do not fit together ({shapes})") from None
            continue
        if "lora_down.weight" not in part or "lora_up.weight" not in part:
            raise LoraError(f"{name}: {key} lacks its {'lora_up' if 'lora_down.weight' in part else 'lora_down'} "
                            "weight; the file is incomplete")
        down, up = part["lora_down.weight"], part["lora_up.weight"]
        # Without .alpha, Kohya's loaders and A1111 use alpha = rank (scale 1).
        alpha = _scalar(part["alpha"], name, f"{key}.alpha") if "alpha" in part else float(down.shape[0])
        modules[key] = Module(down, up, alpha, "alpha" in part)
    return modules


def adapter_type(keys) -> str | None:
    """The LyCORIS/other adapter type whose tensors appear in `keys`, or None for plain LoRA."""
    for key in keys:
        for part in key.split(".")[1:]:
            if part in LYCORIS_MARKS:
                return LYCORIS_MARKS[part]
    return None


def parse_lora(tensors: dict, metadata: dict[str, str] | None, name: str) -> Lora:
    """A file's tensors in whichever format, as Kohya-named modules; unknown content is a LoraError."""
    metadata = dict(metadata or {})
    if not tensors:
        raise LoraError(f"{name} holds no tensors")
    other = adapter_type(tensors)
    if other:
        raise LoraError(f"{name} is a {other} file; lorasmith reads LoRA, LoCon, LoHa and LoKr files")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in tensors):
        raise LoraError(f"{name} is a full checkpoint, not a LoRA: pass it as --model")
    if any(_PEFT.match(k) for k in tensors):
        return Lora(name, _from_peft(tensors, metadata, name), metadata, "diffusers")
    return Lora(name, _from_kohya(tensors, name), metadata, "kohya")


def read_lora(path: Path) -> Lora:
    """A `.safetensors` LoRA from disk, with one sentence naming the file if it cannot be read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path.name}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path.name} is not a readable safetensors file ({exc})") from None
    return parse_lora(tensors, metadata, path.name)


