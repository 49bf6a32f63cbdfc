"""Kohya's block-wise settings: a learning-rate weight, a rank and an alpha per UNet block.

The settings and their meaning are sd-scripts' `networks/lora.py` (`get_block_index`, `get_block_lr_weight`,
`get_block_dims_and_alphas`, `remove_block_dims_and_alphas`); the code is ours. Blocks are counted as the
original (LDM/SGM) UNet numbers its layers, which is how Kohya counts them:

- SD1.x/SD2.x, 25 blocks: 0-11 = input_blocks.0-11, 12 = middle_block, 13-24 = output_blocks.0-11.
  `down_lr_weight` takes 12 values, `mid_lr_weight` 1, `up_lr_weight` 12. Block 0 (input_blocks.0, conv_in)
  never holds an adapter; Kohya counts it so that a list lines up with block-weight tools.
- SDXL, 23 blocks, as sd-scripts counts them since it added SDXL to block lr/dims (commit 58c2d856,
  "support block dim/lr for sdxl"): 0 = time and label embeddings, 1-9 = input_blocks.0-8,
  10-12 = middle_block.0-2 (resnet, transformer, resnet), 13-21 = output_blocks.0-8, 22 = out.
  `down_lr_weight` and `up_lr_weight` take 9 values, `mid_lr_weight` 3; blocks 0 and 22 hold no adapter
  and their learning-rate weight is 1.

A block whose learning-rate weight is 0 (or at most `block_lr_zero_threshold`) gets no adapter at all, as in
Kohya: its rank becomes 0. Unlike Kohya, a list of the wrong length is refused rather than cut or padded
with 1s: a miscounted list would silently put weights on the wrong blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lorasmith.train.schema import ConfigError

LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
RANK_KEYS = ("block_dims", "conv_block_dims")
ALPHA_KEYS = ("block_alphas", "conv_block_alphas")
BLOCK_KEYS = LR_KEYS + RANK_KEYS + ALPHA_KEYS
LR_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
MAX_RANK = 4096


@dataclass(frozen=True)
class Layout:
    """How Kohya counts one family's blocks: `lead` blocks before input_blocks.0 (SDXL's embeddings) and as
    many after the last output block (SDXL's out)."""

    label: str
    down: int
    mid: int
    up: int
    lead: int = 0

    @property
    def total(self) -> int:
        return 2 * self.lead + self.down + self.mid + self.up

    def count(self, key: str) -> int:
        return {"down_lr_weight": self.down, "mid_lr_weight": self.mid, "up_lr_weight": self.up}.get(key, self.total)


SD = Layout("SD1.x/SD2.x", 12, 1, 12)
SDXL = Layout("SDXL", 9, 3, 9, lead=1)
LAYOUTS = {"sd1": SD, "sd2": SD, "sdxl": SDXL}


def layout(family: str) -> Layout:
    try:
        return LAYOUTS[family]
    except KeyError:
        raise ConfigError(f"network: block-wise settings are defined for SD1.x, SD2.x and SDXL, not {family}") from None


# -- module path → block ------------------------------------------------------------------------------------
_LAYER = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?=\.|$)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?=\.|$)")


def layer_of(path: str) -> str | None:
    """The block layer a diffusers module path sits in (`down_blocks.1.attentions.0`, `mid_block.resnets.1`),
    or None outside the down, mid and up blocks."""
    match = _LAYER.match(path) or _MID.match(path)
    return match.group(0) if match else None


def _sizes(layers_per_block, blocks: int) -> list[int]:
    return list(layers_per_block) if isinstance(layers_per_block, (list, tuple)) else [layers_per_block] * blocks


def block_index(path: str, family: str, layers_per_block=2) -> int | None:
    """Kohya's block of a diffusers UNet module path, or None where Kohya names no block (SD1.x's time
    embedding). `layers_per_block` is the UNet config's (2 on SD1.x, SD2.x and SDXL; an int or one per down
    block): a down block is that many input blocks plus its downsampler's, an up block one more, its
    upsampler sharing the last one, as the original layout stacks them (`models/ldm_names.py`).

    A ValueError when the path lies beyond the family's block count (a UNet deeper than the family's)."""
    lay = layout(family)
    if match := _LAYER.match(path):
        side, block, kind, layer = match[1], int(match[2]), match[3], int(match[4])
        sizes = _sizes(layers_per_block, block + 1)
        if side == "down":
            n = 1 + sum(size + 1 for size in sizes[:block]) + (sizes[block] if kind == "downsamplers" else layer)
            place, room = lay.lead + n, lay.down  # input_blocks.0 is conv_in
        else:
            sizes = sizes[::-1]  # the up blocks mirror the down blocks, each one layer longer
            n = sum(size + 1 for size in sizes[:block]) + (sizes[block] if kind == "upsamplers" else layer)
            place, room = lay.lead + lay.down + lay.mid + n, lay.up
        if n >= room:
            raise ValueError(f"{path} is {'input' if side == 'down' else 'output'}_blocks.{n}, beyond the {room} "
                             f"{side} blocks {lay.label} counts")
        return place
    if match := _MID.match(path):
        if lay.mid == 1:
            return lay.lead + lay.down
        n = 2 * int(match[2]) + (match[1] == "attentions")  # middle_block alternates resnet, transformer
        if n >= lay.mid:
            raise ValueError(f"{path} is middle_block.{n}, beyond the {lay.mid} mid blocks {lay.label} counts")
        return lay.lead + lay.down + n
    if path == "conv_in" or path.startswith("conv_in."):
        return lay.lead
    if lay.lead and path.startswith(("time_embedding.", "add_embedding.")):
        return 0
    if lay.lead and path.startswith(("conv_norm_out", "conv_out")):
        return lay.total - 1
    return None


# -- learning-rate weights ----------------------------------------------------------------------------------
def lr_preset(spec: str, count: int) -> list[float]:
    """Kohya's named weight curves over `count` blocks, shallow to deep: sine rises 0 → 1 on a quarter sine,
    cosine falls 1 → 0 (the sine reversed), linear and reverse_linear likewise in a straight line, zeros is 0;
    `name+x` adds x to every value (`cosine+.25` runs 1.25 → 0.25). A ValueError names what is wrong."""
    name, plus, offset = spec.strip().partition("+")
    if name not in LR_PRESETS:
        raise ValueError(f"{spec!r} is neither a list of numbers nor a preset ({', '.join(LR_PRESETS)}, "
                         "optionally with +offset, e.g. 'cosine+.25')")
    try:
        shift = float(offset) if plus else 0.0
    except ValueError:
        raise ValueError(f"{spec!r}: the offset after '+' must be a number, e.g. '{name}+0.25'") from None
    if not math.isfinite(shift):
        raise ValueError(f"{spec!r}: the offset must be a finite number")
    steps = [i / (count - 1) for i in range(count)]
    curve = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps, "zeros": [0.0] * count}
    curve["cosine"], curve["reverse_linear"] = curve["sine"][::-1], steps[::-1]
    return [value + shift for value in curve[name]]


def block_lr_weights(down, mid, up, threshold: float, family: str) -> list[float] | None:
    """One learning-rate weight per block (Layout.total), or None when no weight is set. Unset parts are 1;
    a weight at or below `threshold` becomes 0 (Kohya's rule: such a block gets no adapter)."""
    if not (down or mid or up):
        return None
    lay = layout(family)
    parts = []
    for value, count in ((down, lay.down), (mid, lay.mid), (up, lay.up)):
        weights = lr_preset(value, count) if isinstance(value, str) else list(value or [1.0] * count)
        parts += [w if w > threshold else 0.0 for w in weights]
    return [1.0] * lay.lead + parts + [1.0] * lay.lead


# -- the preset's keys, read and checked --------------------------------------------------------------------
def _numbers(value, key: str, whole: bool) -> list:
    """A list of numbers from a TOML array, one number, or Kohya's comma string (`--set` passes strings)."""
    where = f"network.{key}"
    if isinstance(value, str):
        pieces = [p.strip() for p in value.split(",")] if value.strip() else []
        if any(not p for p in pieces):
            raise ConfigError(f"{where} = {value!r} has an empty value between commas")
        try:
            value = [float(p) for p in pieces]
        except ValueError:
            raise ConfigError(f"{where} = {value!r} must be numbers separated by commas") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{where} = {value!r} must be a list of numbers, e.g. [1, 0.5, 0]")
    if not all(math.isfinite(v) for v in value):
        raise ConfigError(f"{where} holds {next(v for v in value if not math.isfinite(v))}: every value must be "
                          "a finite number")
    if whole:
        if not all(float(v).is_integer() for v in value):
            raise ConfigError(f"{where} holds {next(v for v in value if not float(v).is_integer())}: ranks are "
                              "whole numbers")
        return [int(v) for v in value]
    return [float(v) for v in value]


def _counts(key: str) -> tuple[int, int]:
    return SD.count(key), SDXL.count(key)


def _what(key: str) -> str:
    return {"down_lr_weight": "down block (input_blocks.N)", "mid_lr_weight": "mid block",
            "up_lr_weight": "up block (output_blocks.N)"}.get(key, "UNet block")


def read_block_settings(n) -> None:
    """Normalise and check a NetworkConfig's block keys in place, as far as they can be checked before the base
    is inspected: numbers in their ranges, preset names, lengths that fit one of the families, and the same
    family for every list. The exact count for the base's family is checked by `plan_blocks`."""
    families: dict[str, str] = {}
    for key in BLOCK_KEYS:
        value = getattr(n, key)
        preset = key in ("down_lr_weight", "up_lr_weight") and isinstance(value, str) and "," not in value
        if preset and not _is_number(value):
            if value.strip():
                try:
                    lr_preset(value, 12)
                except ValueError as exc:
                    raise ConfigError(f"network.{key} = {exc}") from None
            setattr(n, key, value.strip())
            continue
        value = _numbers(value, key, key in RANK_KEYS)
        setattr(n, key, value)
        if not value:
            continue
        sd, xl = _counts(key)
        if len(value) not in (sd, xl):
            raise ConfigError(f"network.{key} has {len(value)} value(s); it takes one per {_what(key)}: {sd} on "
                              f"SD1.x/SD2.x, {xl} on SDXL")
        families[key] = SD.label if len(value) == sd else SDXL.label
        if key in LR_KEYS and min(value) < 0:
            raise ConfigError(f"network.{key} holds {min(value):g}: a learning-rate weight is ≥ 0 (0 gives the "
                              "block no adapter)")
        if key in RANK_KEYS and not all(0 <= v <= MAX_RANK for v in value):
            raise ConfigError(f"network.{key} holds {next(v for v in value if not 0 <= v <= MAX_RANK)}: a rank "
                              f"is in [0, {MAX_RANK}] (0 gives the block no adapter)")
        if key in ALPHA_KEYS and min(value) <= 0:
            raise ConfigError(f"network.{key} holds {min(value):g}: an alpha is > 0")
    if len(set(families.values())) > 1:
        first = next(iter(families))
        other = next(k for k, f in families.items() if f != families[first])
        raise ConfigError(f"network.{first} has {families[first]}'s count of values but network.{other} "
                          f"{families[other]}'s: write them all for the family you train")
    _check_combinations(n)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def block_settings_set(n) -> bool:
    """Whether any block key is set: then the UNet's adapters follow a block plan."""
    return any(getattr(n, key) not in ([], "", None) for key in BLOCK_KEYS)


def _check_combinations(n) -> None:
    if n.block_lr_zero_threshold and not any(getattr(n, k) not in ([], "") for k in LR_KEYS):
        raise ConfigError("network.block_lr_zero_threshold applies to down_lr_weight, mid_lr_weight and "
                          "up_lr_weight; none is set")
    if not block_settings_set(n):
        return
    if n.network_module not in ("lora", "locon"):
        key = next(k for k in BLOCK_KEYS if getattr(n, k) not in ([], ""))
        raise ConfigError(f"network.{key} applies to lora and locon (Kohya's networks/lora.py), not "
                          f"{n.network_module}")
    if n.conv_block_alphas and not (n.conv_block_dims or n.conv_dim or n.network_module == "locon"):
        raise ConfigError("network.conv_block_alphas needs convolution adapters: set conv_dim or conv_block_dims")


# -- the plan for one base ----------------------------------------------------------------------------------
@dataclass
class BlockPlan:
    """Per block (Layout.total of them): learning-rate weight (None: all 1), rank and alpha for Linear and 1×1
    layers, and for 3×3 convolutions (None: no convolution adapters). Rank 0 means no adapter."""

    family: str
    layers_per_block: object
    lr: list[float] | None
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float]
    dropped: set = field(default_factory=set)
    """Blocks left without any adapter by `arguments` (weight or rank 0), for the plan's line."""

    def index(self, path: str) -> int:
        """The block of `path`; a ConfigError where this UNet does not fit the family's count."""
        try:
            found = block_index(path, self.family, self.layers_per_block)
        except ValueError as exc:
            raise ConfigError(f"network: block-wise settings cannot place this UNet's layers: {exc}") from None
        if found is None:
            raise ConfigError(f"network: {path} lies in no UNet block; block-wise settings cannot place it")
        return found

    def weight(self, path: str) -> float:
        return self.lr[self.index(path)] if self.lr else 1.0

    def rank(self, path: str, conv3x3: bool) -> tuple[int, float]:
        """(rank, alpha) of the module at `path`; rank 0 when it gets no adapter."""
        i = self.index(path)
        if conv3x3:
            return (self.conv_dims[i], self.conv_alphas[i]) if self.conv_dims else (0, 1.0)
        return self.dims[i], self.alphas[i]

    @property
    def conv(self) -> bool:
        return bool(self.conv_dims) and any(self.conv_dims)

    def arguments(self, paths: list[str], is_conv3x3) -> tuple[list[str], dict, dict]:
        """peft's arguments for the candidate module `paths`: the modules that get an adapter (rank > 0), and
        rank_pattern/alpha_pattern keys, one per distinct value and kind, each an alternation of the block
        layers holding it (a key per module would make peft compile hundreds of regexes per module). 3×3 keys
        come first: peft takes the first key that matches, and a layer's 3×3 and other modules differ."""
        targets, ranks, alphas = [], {}, {}
        kept, self.dropped = set(), set()
        for path in paths:
            conv = bool(is_conv3x3(path))
            rank, alpha = self.rank(path, conv)
            if rank <= 0:
                self.dropped.add(self.index(path))
                continue
            kept.add(self.index(path))
            targets.append(path)
            ranks.setdefault((not conv, rank), set()).add(layer_of(path))
            alphas.setdefault((not conv, alpha), set()).add(layer_of(path))
        self.dropped -= kept  # a block whose convolutions alone are at rank 0 still holds adapters
        return targets, _patterns(ranks), _patterns(alphas)

    def describe(self, lr_groups: int) -> str:
        """The plan's words for the network line: learning rates and the blocks left out, as Kohya logs them."""
        weights = f"{lr_groups} UNet learning rate(s)" if self.lr else "per-block ranks"
        left = ", ".join(map(str, sorted(self.dropped)))
        return f"block-wise: {weights}" + (f"; no adapter in block(s) {left}" if left else "")


def _patterns(groups: dict) -> dict:
    out = {}
    for (other, value), layers in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1])):
        alternation = "|".join(re.escape(layer) for layer in sorted(layers))
        out[f"(?:{alternation})\\." + (".+" if other else "(?:conv1|conv2|conv)")] = value
    return out


def plan_blocks(n, family: str, layers_per_block=2) -> BlockPlan | None:
    """The block plan of NetworkConfig `n` on a base of `family`; None when no block key is set. A ConfigError,
    one sentence, when a list's length does not fit the family."""
    read_block_settings(n)  # a no-op for a preset load_config read; a config built in code is checked here
    if not block_settings_set(n):
        return None
    lay = layout(family)
    for key in BLOCK_KEYS:
        value = getattr(n, key)
        if isinstance(value, list) and value and len(value) != lay.count(key):
            raise ConfigError(f"network.{key} has {len(value)} value(s), but an {lay.label} base takes "
                              f"{lay.count(key)} (one per {_what(key)})")
    lr = block_lr_weights(n.down_lr_weight, n.mid_lr_weight, n.up_lr_weight, n.block_lr_zero_threshold, family)
    dims = list(n.block_dims or [n.network_dim] * lay.total)
    alphas = list(n.block_alphas or [n.network_alpha] * lay.total)
    locon = n.network_module == "locon" and not n.conv_dim
    conv_rank = n.network_dim if locon else n.conv_dim
    conv_alpha = n.network_alpha if locon else n.conv_alpha
    conv_dims = list(n.conv_block_dims or ([conv_rank] * lay.total if conv_rank else [])) or None
    conv_alphas = list(n.conv_block_alphas or [conv_alpha] * lay.total)
    for i, weight in enumerate(lr or ()):
        if weight == 0:  # Kohya: no learning rate, no module
            dims[i] = 0
            if conv_dims:
                conv_dims[i] = 0
    return BlockPlan(family, layers_per_block, lr, dims, alphas, conv_dims, conv_alphas)
