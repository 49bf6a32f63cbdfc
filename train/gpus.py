"""The cards people rent for LoRA training: memory and dense fp16/bf16 tensor-core peak, from vendors' data sheets.

Peaks are dense (NVIDIA's data sheets print the 2:4-sparsity figure first, marked *; training never uses it, so
it is halved here). GeForce cards run fp16/bf16 matmuls with fp32 accumulation (what PyTorch asks for) at half
their fp16-accumulate rate: the whitepapers' "with FP32 Accumulate" row is the one used.
"""

from __future__ import annotations

from dataclasses import dataclass


class CardError(ValueError):
    """A --gpu name that matches no card, or several."""


@dataclass(frozen=True)
class Card:
    name: str
    memory_gb: float
    """The data sheet's figure (GB as vendors print it; the GPUs hold that many GiB, less what ECC and the
    driver keep: see USABLE)."""
    fp16_tflops: float
    """Dense fp16 tensor-core peak, fp32 accumulate."""
    bf16_tflops: float | None
    """None where the card has no bf16 tensor cores (T4)."""
    aliases: tuple[str, ...] = ()
    fp32_tflops: float = 0.0
    """Non-tensor fp32 rate: what bf16 falls back to on a card without bf16 units."""

    def peak(self, precision: str) -> float:
        """TFLOPS for the run's matmuls: fp16/bf16 on tensor cores; fp32 ("no") at the TF32 rate PyTorch does not
        use by default, so the fp32 rate; bf16 on a card without it at its fp32 rate."""
        if precision == "bf16":
            return self.bf16_tflops or self.fp32_tflops
        if precision == "fp16":
            return self.fp16_tflops
        return self.fp32_tflops


USABLE = 0.94
"""Share of the data sheet's memory a training process can allocate: nvidia-smi shows 15,360 MiB on a 16 GB T4
and 23,028 MiB on a 24 GB A10 with ECC on, 24,564 MiB on a 24 GB RTX 4090 after the driver's share."""

CARDS = (
    # NVIDIA T4 Tensor Core GPU data sheet (nvidia.com, t4-tensor-core-datasheet-951643.pdf): 16 GB GDDR6;
    # "Mixed Precision (FP16/FP32) 65 TFLOPS"; single precision 8.1 TFLOPS. Turing has no bf16.
    Card("T4", 16, 65.0, None, ("t4", "tesla t4"), 8.1),
    # NVIDIA L4 Tensor Core GPU data sheet: 24 GB GDDR6; FP16 and BF16 Tensor Core 242 TFLOPS* (sparse);
    # FP32 30.3 TFLOPS.
    Card("L4", 24, 121.0, 121.0, ("l4",), 30.3),
    # NVIDIA A10 Tensor Core GPU data sheet: 24 GB GDDR6; BF16 and FP16 Tensor Core 125 | 250* TFLOPS;
    # FP32 31.2 TFLOPS.
    Card("A10", 24, 125.0, 125.0, ("a10", "a10g"), 31.2),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, RTX 3090 column: 24 GB GDDR6X; Peak FP16 and BF16 Tensor
    # TFLOPS with FP32 Accumulate 71 / 142 (sparse); FP32 35.6.
    Card("RTX 3090", 24, 71.0, 71.0, ("3090", "rtx3090", "rtx 3090"), 35.6),
    # NVIDIA Ada GPU Architecture whitepaper, RTX 4090 column: 24 GB GDDR6X; Peak FP16 and BF16 Tensor TFLOPS
    # with FP32 Accumulate 165.2 / 330.4 (sparse); FP32 82.6.
    Card("RTX 4090", 24, 165.2, 165.2, ("4090", "rtx4090", "rtx 4090"), 82.6),
    # NVIDIA RTX Blackwell GPU Architecture whitepaper, RTX 5090 column: 32 GB GDDR7; Peak FP16 and BF16 Tensor
    # TFLOPS with FP32 Accumulate 209.5 / 419 (sparse) (838 is fp16-accumulate, sparse); FP32 104.8.
    Card("RTX 5090", 32, 209.5, 209.5, ("5090", "rtx5090", "rtx 5090"), 104.8),
    # NVIDIA A100 Tensor Core GPU data sheet: 40 GB HBM2 / 80 GB HBM2e; BF16 and FP16 Tensor Core
    # 312 | 624* TFLOPS; FP32 19.5.
    Card("A100-40GB", 40, 312.0, 312.0, ("a100-40gb", "a100 40gb", "a100-40", "a100_40gb"), 19.5),
    Card("A100-80GB", 80, 312.0, 312.0, ("a100-80gb", "a100 80gb", "a100-80", "a100_80gb", "a100"), 19.5),
    # NVIDIA L40S GPU data sheet: 48 GB GDDR6; BF16 and FP16 Tensor Core 362.05 | 733* TFLOPS; FP32 91.6.
    Card("L40S", 48, 362.05, 362.05, ("l40s",), 91.6),
    # NVIDIA H100 Tensor Core GPU data sheet, H100 SXM: 80 GB HBM3; BF16 and FP16 Tensor Core 1,979* TFLOPS
    # (sparse); FP32 67.
    Card("H100 SXM", 80, 989.5, 989.5, ("h100", "h100 sxm", "h100-sxm", "h100sxm"), 67.0),
    # NVIDIA H200 Tensor Core GPU data sheet, H200 SXM: 141 GB HBM3e; BF16 and FP16 Tensor Core 1,979*
    # TFLOPS (sparse); FP32 67.
    Card("H200", 141, 989.5, 989.5, ("h200", "h200 sxm", "h200-sxm"), 67.0),
)


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def find_card(name: str) -> Card:
    """The card a --gpu NAME means, case- and punctuation-insensitive ("4090", "rtx-4090", "H100"): an exact
    name or alias first, else the only card whose name contains it. Raises CardError with the names to choose."""
    wanted = _key(name)
    if not wanted:
        raise CardError("--gpu needs a card name, e.g. --gpu 4090")
    exact = [c for c in CARDS if wanted in {_key(c.name), *map(_key, c.aliases)}]
    if exact:
        return exact[0]
    partial = [c for c in CARDS if wanted in _key(c.name)]
    if len(partial) == 1:
        return partial[0]
    known = ", ".join(c.name for c in CARDS)
    if partial:
        raise CardError(f"--gpu {name} matches {', '.join(c.name for c in partial)}: name one of them")
    raise CardError(f"--gpu {name} is not a card preflight knows; known cards: {known}")
