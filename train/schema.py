"""The preset's schema: a tree of typed dataclasses whose defaults explain themselves, each number with its range.

Setting names follow Kohya's where a Kohya user would look for them (`network_dim`, `learning_rate`,
`clip_skip`, ...), so their knowledge carries over. Hyperparameters live here; runtime flags (device,
dry run) stay on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CONFIG_VERSION = 1
MAX_SEED = 2**32 - 1
"""numpy's seed range, which accelerate's set_seed passes the seed to."""


class ConfigError(ValueError):
    """A preset that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take, checked once where the preset is read."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return (f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
                if self.low is not None else f"{'<' if self.high_open else '≤'} {self.high:g}")


def ranged(default, low=None, high=None, *, low_open=False, high_open=False, hint=""):
    """A dataclass field whose value must lie in the given range."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open, hint)})


@dataclass
class ModelConfig:
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id, local diffusers folder or single-file checkpoint (.safetensors, .ckpt) in the original layout.
    The old runwayml/stable-diffusion-v1-5 id is mapped to this one."""
    v_parameterization: bool = False
    """Kohya's switch for v-prediction models; the same as prediction_type = "v_prediction"."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """auto: from the scheduler's config, or for a single file from its tensors (an SD2.x file without its
    training step reads as 768-v: set "epsilon" for SD2.x-base files)."""
    clip_l: str = ""
    """Flux.1 transformer files only (BFL's layout, as ComfyUI keeps them): CLIP-L's own file (clip_l.safetensors)."""
    t5xxl: str = ""
    """Flux.1 transformer files only: T5-XXL's own file (t5xxl_fp16.safetensors)."""
    ae: str = ""
    """Flux.1 transformer files only: the VAE's own file (ae.safetensors)."""
    t5_tokenizer: str = "google/t5-v1_1-xxl"
    """Flux.1 transformer files only: T5's tokenizer (a hub id in the local cache, or a folder)."""

    def companions(self) -> dict:
        """The files a Flux.1 transformer file needs beside it, for models.base.load_components."""
        return {"clip_l": self.clip_l, "t5xxl": self.t5xxl, "ae": self.ae, "t5_tokenizer": self.t5_tokenizer}

    base_precision: Literal["auto", "fp8"] = "auto"
    """How the frozen base is stored. auto: in training.mixed_precision's dtype (fp32 without it). fp8: the
    UNet's and text encoders' Linear/conv weights in float8_e4m3fn, cast up layer by layer for compute
    (sd-scripts' --fp8_base): half of bf16's weight memory, slightly coarser base; adapters stay fp32."""


@dataclass
class DatasetConfig:
    train_data_dir: str = ""
    """A Kohya training root of <repeats>_<tokens> folders, or a folder with metadata.jsonl."""
    reg_data_dir: str = ""
    prior_loss_weight: float = ranged(1.0, 0)
    caption_extension: str = ".txt"
    resolution: int = ranged(512, 64, 8192)
    min_bucket_reso: int = ranged(256, 64, 8192)
    max_bucket_reso: int = ranged(1024, 64, 8192)
    bucket_reso_steps: int = ranged(64, 8, 1024, hint="a multiple of 8: the VAE halves each side three times")
    shuffle_caption: bool = False
    keep_tokens: int = ranged(0, 0)
    caption_dropout_rate: float = ranged(0.0, 0, 1, high_open=True)
    flip_aug: bool = False
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = True
    max_token_length: Literal[75, 150, 225] = 75
    """Caption tokens the text encoders read (Kohya's max_token_length): 150 or 225 read long captions in chunks
    of 75; the rest of a caption is cut. Tag lists past 75 tokens are common on anime bases."""
    t5xxl_max_token_length: int = ranged(0, 0, 512, hint="0: 512 for Flux.1 dev, 256 for schnell")
    """Flux only: T5 tokens each caption is encoded to (Kohya's t5xxl_max_token_length)."""
    validation_split: float = ranged(0.0, 0, 1, high_open=True, hint="e.g. 0.1 holds out 10 %")
    """Fraction of the pictures held out of training to measure a validation loss each epoch (0 = none)."""


@dataclass
class NetworkConfig:
    network_module: Literal["lora", "locon", "loha", "lokr", "dylora"] = "lora"
    """lora (with conv_dim: LoCon), locon (conv_dim defaults to network_dim), loha and lokr (LyCORIS' Hadamard
    and Kronecker products: more capacity per parameter), dylora (a LoRA whose first unit, 2·unit, … ranks
    each work alone: pick the rank after training with `lora resize`)."""
    network_dim: int = ranged(64, 1, 4096)
    network_alpha: float = ranged(32.0, 0, low_open=True)
    conv_dim: int = ranged(0, 0, 4096, hint="0 is off")
    """Rank of LoCon adapters on the UNet's ResNet convolutions; 0 trains attention only."""
    conv_alpha: float = ranged(1.0, 0, low_open=True)
    network_dropout: float = ranged(0.0, 0, 1, high_open=True)
    rank_dropout: float = ranged(0.0, 0, 1, high_open=True, hint="LoHa/LoKr only")
    module_dropout: float = ranged(0.0, 0, 1, high_open=True, hint="LoHa/LoKr only")
    factor: int = ranged(-1, -1, 4096, hint="LoKr only; -1 splits each side as evenly as it divides")
    unit: int = ranged(1, 1, 4096, hint="DyLoRA only")
    """DyLoRA: the step between the ranks it trains to work alone; network_dim (and conv_dim) are multiples."""
    use_tucker: bool = False
    """LoHa/LoKr: 3×3 convolutions in Tucker form (hada_t1/t2, lokr_t2), fewer parameters."""
    network_target: Literal["kohya", "attention"] = "kohya"
    """kohya: every Linear and 1×1 convolution in the UNet's transformer blocks, as Kohya's networks/lora.py and
    every civitai recipe assume; attention: the attention projections alone (the LoRA paper's choice)."""
    split_qkv: bool = False
    """Flux only. false (Kohya's default): each fused BFL layer (a double block's img/txt qkv, a single block's
    linear1) is one LoRA of network_dim, its q, k, v (and MLP input) parts sharing one down projection; true: each
    part has its own down, the file's fused modules then have rank 3× (linear1 4×) network_dim, as Kohya's
    split_qkv=True writes them."""
    train_t5xxl: bool = False
    """Flux only: adapters on T5-XXL too (`lora_te3_…`), at optimizer.text_encoder_lr. T5's outputs can then not be
    cached, and its 4.7 B parameters stay on the card during training: mostly not worth it (Kohya's view too)."""
    # Kohya's block-wise settings (train/blocks.py), lora and locon only. Blocks as the original UNet counts
    # them: SD1.x/SD2.x 25 = input_blocks 0-11, middle_block, output_blocks 0-11; SDXL 23 = embeddings,
    # input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out. Empty: not used.
    down_lr_weight: list[float] | str = field(default_factory=list)
    """A multiplier of the UNet's learning rate per down block (input_blocks.0-…: 12 on SD1.x/SD2.x, 9 on SDXL),
    or a curve: sine, cosine, linear, reverse_linear, zeros, with an optional +offset ("cosine+.25"). Unset
    parts are 1; a block at weight 0 (or at most block_lr_zero_threshold) gets no adapter."""
    mid_lr_weight: list[float] = field(default_factory=list)
    """The mid block's multiplier: 1 value on SD1.x/SD2.x, 3 on SDXL (middle_block.0-2)."""
    up_lr_weight: list[float] | str = field(default_factory=list)
    """As down_lr_weight, for the up blocks (output_blocks.0-…, deepest first: 12 or 9)."""
    block_lr_zero_threshold: float = ranged(0.0, 0, hint="weights at or below it count as 0")
    """Learning-rate weights at or below it become 0: those blocks get no adapter."""
    block_dims: list[int] = field(default_factory=list)
    """A rank per block (25 on SD1.x/SD2.x, 23 on SDXL) for Linear and 1×1 layers; 0 = no adapter there.
    Empty: network_dim everywhere."""
    block_alphas: list[float] = field(default_factory=list)
    """An alpha per block; empty: network_alpha everywhere."""
    conv_block_dims: list[int] = field(default_factory=list)
    """A rank per block for the ResNet 3×3 convolutions (LoCon; turns them on even with conv_dim = 0)."""
    conv_block_alphas: list[float] = field(default_factory=list)
    """An alpha per block for the 3×3 convolutions; empty: conv_alpha everywhere."""


@dataclass
class OptimizerConfig:
    optimizer_type: Literal["AdamW8bit", "AdamW", "Lion", "Prodigy", "Adafactor"] = "AdamW8bit"
    learning_rate: float = ranged(1e-4, 0, low_open=True)
    unet_lr: float = ranged(0.0, 0, hint="0 means learning_rate")
    """0 means learning_rate."""
    text_encoder_lr: float = ranged(0.0, 0, hint="0 leaves the text encoder frozen")
    """0 leaves the text encoder frozen (its outputs can then be cached)."""
    weight_decay: float = ranged(0.01, 0)
    max_grad_norm: float = ranged(1.0, 0, hint="0 turns clipping off")


@dataclass
class ScheduleConfig:
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial"] = "cosine"
    lr_warmup_steps: float = ranged(0.1, 0, hint="below 1 a fraction of all steps, else a step count")
    """Below 1: a fraction of all steps; 1 or more: a number of steps."""
    lr_scheduler_num_cycles: int = ranged(1, 1, 1000)


@dataclass
class TrainingConfig:
    max_train_epochs: int = ranged(10, 0, 100_000)
    max_train_steps: int = ranged(0, 0, 100_000_000)
    """0 means max_train_epochs decides."""
    train_batch_size: int = ranged(1, 1, 4096)
    gradient_accumulation_steps: int = ranged(1, 1, 4096)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    clip_skip: int = ranged(1, 1, 48, hint="Kohya's convention: 1 = last layer, 2 = penultimate")
    """Kohya's convention: 1 = last layer, 2 = penultimate layer (anime models)."""
    seed: int = ranged(42, 0, MAX_SEED)
    noise_offset: float = ranged(0.0, 0, 1, hint="0.05-0.1 is usual")
    min_snr_gamma: float = ranged(0.0, 0, hint="0 is off; 5 is the paper's value")
    gradient_checkpointing: bool = False
    timestep_sampling: Literal["uniform", "sigmoid", "shift", "flux_shift"] = "shift"
    """Flux only: how noise levels σ are drawn (Kohya's --timestep_sampling; train/flow.py)."""
    sigmoid_scale: float = ranged(1.0, 0, low_open=True)
    """Flux only: the spread of the sigmoid draw; larger is closer to uniform."""
    discrete_flow_shift: float = ranged(3.1582, 0, low_open=True)
    """Flux only: `shift`'s push towards noise (Kohya's recommended 3.1582 for Flux.1 dev)."""
    guidance_scale: float = ranged(1.0, 0)
    """Flux.1 dev only: the guidance input during training (1.0, as Kohya recommends for LoRAs)."""
    zero_terminal_snr: bool | Literal["auto"] = "auto"
    """Rescale the noise schedule so its last step is pure noise (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"); v-prediction only. auto: as the base declares it (a single file's
    `ztsnr` key, a diffusers folder's `rescale_betas_zero_snr`), as NoobAI-XL v-pred does."""


@dataclass
class OutputConfig:
    output_dir: str = "output"
    output_name: str = "lora"
    save_precision: Literal["fp16", "bf16", "float"] = "fp16"
    save_every_n_epochs: int = ranged(0, 0)
    save_state: bool = True
    """Write a resumable state (weights, optimizer, schedule, RNG, data position) with every epoch save."""
    save_state_every_n_steps: int = ranged(0, 0)
    """Also write a state every N optimizer steps (0 = only with epoch saves and on SIGTERM/SIGINT)."""
    save_last_n_states: int = ranged(2, 1)
    """States kept on disk; older ones are removed once a newer one is complete."""
    log_tensorboard: bool = True
    """TensorBoard event files beside loss.csv when the tensorboard package is installed."""
    trigger_phrase: str = ""
    """Written to modelspec.trigger_phrase so UIs can show it; defaults to the first folder's tokens."""


SAMPLERS = ("ddim", "pndm", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "ddpm", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


@dataclass
class SampleConfig:
    sample_prompts: str = ""
    """A prompts file in Kohya's format (one prompt a line, --n --w --h --d --l --s options, # comments)."""
    sample_every_n_epochs: int = ranged(0, 0)
    sample_every_n_steps: int = ranged(0, 0)
    sample_at_first: bool = False
    """Sample once before training, to see the base model's output beside the trained ones."""
    sample_sampler: Literal[SAMPLERS] = "ddim"  # type: ignore[valid-type]


@dataclass
class Config:
    config_version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
