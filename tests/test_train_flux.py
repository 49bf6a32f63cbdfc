"""train-lora on Flux.1: the flow-matching objective and its σ draws against hand computation; a tiny Flux (built
from configs in the test) trained with CLIP-L, samples and validation; the file in Kohya's Flux names, loaded by
diffusers' FluxPipeline as trained; a full-width single block, whose fused layout diffusers only reads at 3072
wide; SIGKILL and resume."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_dataset, write_preset

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("sigma, method, shift, patches, expected", [
    (0.5, "shift", 3.0, 1024, 0.75),                                   # 1.5 / (1 + 2·0.5)
    (0.25, "shift", 3.1582, 1024, 0.25 * 3.1582 / (1 + 2.1582 * 0.25)),
    (0.5, "flux_shift", 3.0, 256, math.exp(0.5) / (math.exp(0.5) + 1)),  # μ = 0.5 at 256 patches
    (0.5, "flux_shift", 3.0, 4096, math.exp(1.15) / (math.exp(1.15) + 1)),  # μ = 1.15 at 4096
    (0.2, "flux_shift", 3.0, 1024, math.exp(0.63) / (math.exp(0.63) + 4)),  # μ = 0.5 + 0.65·768/3840
    (0.3, "sigmoid", 3.0, 1024, 0.3),
])
def test_sigma_shifts_match_hand_computation(sigma, method, shift, patches, expected):
    from lorasmith.train.flow import shift_sigmas

    assert float(shift_sigmas(torch.tensor(sigma, dtype=torch.float64), method, shift, patches)) == \
        pytest.approx(expected, rel=1e-9)


class Recorder:
    """A family stand-in whose denoiser predicts zeros and remembers what it was given."""

    guided = True

    def predict(self, model, noisy, timesteps, inputs):
        self.seen = (noisy, timesteps, inputs)
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("method", ["sigmoid", "shift", "flux_shift"])
def test_flow_draw_noisy_input_and_target_match_hand_computation(method):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from lorasmith.train.flow import FlowObjective

    training = SimpleNamespace(timestep_sampling=method, sigmoid_scale=1.3, discrete_flow_shift=3.0,
                               guidance_scale=3.5)
    family = Recorder()
    objective = FlowObjective(FlowMatchEulerDiscreteScheduler(), family, training)
    latents = torch.randn(3, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 16, 8, 12, generator=torch.Generator().manual_seed(2))
    steps = objective.draw(latents, torch.Generator().manual_seed(5))
    s = torch.sigmoid(1.3 * torch.randn(3, generator=torch.Generator().manual_seed(5)))
    if method == "shift":
        s = 3 * s / (1 + 2 * s)
    elif method == "flux_shift":  # 4 × 6 = 24 patches: μ = 0.5 + 0.65 · (24 − 256) / 3840
        mu = math.exp(0.5 + 0.65 * (24 - 256) / 3840)
        s = mu / (mu + 1 / s - 1)
    torch.testing.assert_close(steps, s * 1000)
    loss = objective.loss(None, latents, {"encoder_hidden_states": None}, noise, steps)
    noisy, seen_steps, inputs = family.seen
    sigma = (steps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    assert torch.equal(seen_steps, steps) and inputs["guidance"].tolist() == [3.5] * 3
    # the prediction is zero, so the loss is the mean square of the velocity ε − x
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean(dim=(1, 2, 3)))


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    data = small_dataset(root / "data", images=4, repeats=4, size=(96, 64))
    (root / "prompts.txt").write_text("claymation style, a blob --w 64 --h 64 --s 2 --l 3.5\n", encoding="utf-8")
    return data, root / "prompts.txt"


def preset(root: Path, base: Path, data: Path, **sections) -> Path:
    sections["dataset"] = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128,
                           "t5xxl_max_token_length": 32, **sections.get("dataset", {})}
    root.mkdir(exist_ok=True)
    return write_preset(root / "p.toml", base, data, root / "out", **sections)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_flux_lora_is_kohya_named_and_loads_in_diffusers_as_trained(tiny_flux, flux_data, tmp_path, split_qkv):
    """CLIP-L trained, a held-out picture, samples: every fused BFL layer is one module, Kohya's rank-4 LoRA of the
    fused weight (one down, the parts' ups stacked) or with split_qkv its parts side by side; diffusers'
    FluxPipeline.load_lora_weights of the file gives every adapted layer of the live model (the double blocks and
    CLIP-L) within 1e-5. (diffusers reads single blocks only at Flux's real width: the next test.)"""
    from diffusers import FluxPipeline

    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import run

    data, prompts = flux_data
    path = preset(tmp_path, tiny_flux, data, dataset={"validation_split": 0.25},
                  optimizer={"learning_rate": 1e-2, "text_encoder_lr": 1e-2}, network={"split_qkv": split_qkv},
                  sample={"sample_prompts": str(prompts), "sample_every_n_steps": 4})
    result, _ = run(load_config(path), progress=False, log=lambda message: None)
    file = tmp_path / "out" / "test.safetensors"
    with safe_open(str(file), "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
        qkv = handle.get_tensor("lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight")
        linear1 = handle.get_tensor("lora_unet_single_blocks_1_linear1.lora_down.weight")
        alpha = float(handle.get_tensor("lora_unet_single_blocks_1_linear1.alpha"))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    per_block = {"img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin", "txt_attn_qkv",
                 "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"}
    expected = {f"lora_unet_double_blocks_{i}_{m}" for i in range(2) for m in per_block}
    expected |= {f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2", "modulation_lin")}
    assert {m for m in modules if m.startswith("lora_unet_")} == expected
    assert any(m.startswith("lora_te1_text_model_encoder_layers_1_") for m in modules)
    assert not any(m.startswith(("lora_te2", "lora_te3")) for m in modules)  # T5 stays frozen
    if split_qkv:  # q, k, v side by side: rank 3·4, up block-diagonal (96 rows = 3 × 32)
        assert qkv.shape == (96, 12) and not qkv[:32, 4:].any() and not qkv[32:64, :4].any()
        # linear1 holds q, k, v and the MLP's input: alpha / rank stays 2 / 4 over the summed rank 16
        assert linear1.shape == (16, 32) and alpha == 2 * 4
        assert json.loads(meta["ss_network_args"]) == {"split_qkv": "True"}
    else:  # one down for q, k, v: rank 4, every up column trained
        assert qkv.shape == (96, 4) and qkv[:32].abs().min() > 0 and qkv[64:].abs().min() > 0
        assert linear1.shape == (4, 32) and alpha == 2
        assert meta["ss_network_args"] == "{}"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_guidance_scale"]) == (
        "flux1", "flux-1-dev/lora", "1.0")
    assert len(result.validation) >= 1 and len(list((tmp_path / "out" / "test.samples").glob("*-grid.png"))) == 1

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights({k: v for k, v in load_file(str(file)).items() if "single_blocks" not in k})
    live, clip = result.unet.eval(), result.text_encoders[0].eval()
    theirs = dict(pipe.transformer.named_modules())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compared = 0
        for name, module in live.named_modules():
            if name.startswith("transformer_blocks.") and hasattr(module, "lora_A"):
                inputs = x[:, : module.in_features]
                torch.testing.assert_close(module(inputs), theirs[name](inputs), atol=1e-5, rtol=0)
                assert (module(inputs) - module.base_layer(inputs)).abs().max() > 1e-4
                compared += 1
        assert compared == 2 * 14
        ids = pipe.tokenizer(["claymation style, a blob"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        torch.testing.assert_close(clip(ids).pooler_output, pipe.text_encoder(ids).pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_a_full_width_single_block_loads_in_diffusers_as_trained(split_qkv):
    """At Flux.1's width (3072, MLP 12288) diffusers splits `linear1` back into q, k, v and the MLP input, from
    Kohya's unsplit module (one down) and from a split one: the loaded transformer gives the live one's output
    within 1e-5, and not the base's."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from lorasmith.lorafile.export import kohya_state_dict
    from lorasmith.models.families import family_named
    from lorasmith.train.network import add_unet_lora, share_fused_downs

    flux = family_named("flux")
    config = dict(patch_size=1, in_channels=64, num_layers=0, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                  axes_dims_rope=(16, 56, 56))
    torch.manual_seed(0)
    live = FluxTransformer2DModel(**config)
    base = FluxTransformer2DModel(**config)
    base.load_state_dict(live.state_dict())
    add_unet_lora(live, 4, 2.0, targets=flux.targets("kohya"))
    if not split_qkv:
        assert share_fused_downs(live, flux.fused_parts(live)) == 3  # k, v and the MLP input take q's down
    generator = torch.Generator().manual_seed(3)
    for name, param in live.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.01
    loaded = FluxTransformer2DModel(**config)
    loaded.load_state_dict(base.state_dict())
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=loaded)
    tensors = kohya_state_dict(live, None, torch.float32, flux)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288,
                                                                                 16 if split_qkv else 4)
    pipe.load_lora_weights(tensors)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                  pooled_projections=torch.randn(1, 32, generator=generator), txt_ids=torch.zeros(8, 3),
                  img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))
    with torch.no_grad():
        ours = live(**inputs).sample
        torch.testing.assert_close(ours, pipe.transformer(**inputs).sample, atol=1e-5, rtol=0)
        assert (ours - base(**inputs).sample).abs().max() > 1e-4


def test_flux_sigkill_then_resume_gives_the_same_lora(tiny_flux, flux_data, tmp_path):
    """Killed (SIGKILL) once its step-3 row is logged, then resumed: the LoRA equals the uninterrupted run's."""
    from test_train_resume import finish, same_lora, wait_for_step

    data, _ = flux_data
    path = preset(tmp_path, tiny_flux, data, training={"max_train_steps": 6, "train_batch_size": 1},
                  output={"save_state_every_n_steps": 1, "save_last_n_states": 2})

    def train(out, *extra):
        return subprocess.Popen([str(BIN / "train-lora"), str(path), "--quiet", "--set", f"output.output_dir={out}",
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    code, err = finish(train(tmp_path / "reference"))
    assert code == 0, err[-3000:]
    out = tmp_path / "out"
    process = train(out)
    wait_for_step(out, 3, process)
    process.kill()
    process.wait()
    code, err = finish(train(out, "--resume", "auto"))
    assert code == 0 and "resumed from" in err, err[-3000:]
    same_lora(out / "test.safetensors", tmp_path / "reference" / "test.safetensors")
    shutil.rmtree(out / "test.state")


@pytest.mark.parametrize("section, key, value, words", [
    ("network", "network_module", "loha", 'network.network_module = "loha" is not available for Flux.1 yet'),
    ("network", "conv_dim", 8, "network.conv_dim = 8: Flux.1's transformer has no convolutions"),
    ("network", "block_dims", [4] * 25, "network.block_dims is a UNet block setting"),
    ("training", "min_snr_gamma", 5.0, "training.min_snr_gamma = 5 weights ε/v-prediction losses"),
    ("model", "prediction_type", "v_prediction", "model.prediction_type is for ε/v-prediction bases"),
    ("dataset", "bucket_reso_steps", 8, "bucket sides must be multiples of 16 px"),
])
def test_keys_flux_cannot_honour_are_refused_in_one_sentence(section, key, value, words):
    from lorasmith.models.families import family_named
    from lorasmith.train.config import Config, ConfigError
    from lorasmith.train.flow_checks import check_flow_preset

    config = Config()
    setattr(getattr(config, section), key, value)
    with pytest.raises(ConfigError, match=re.escape(words)):
        check_flow_preset(family_named("flux"), config)
    check_flow_preset(family_named("sdxl"), config)  # a UNet family takes them
    check_flow_preset(family_named("flux"), Config())


def test_flux_network_keys_elsewhere_and_t5_without_a_rate_are_refused(tiny_flux, flux_data, tmp_path):
    from lorasmith.models.families import family_named
    from lorasmith.train.config import Config, ConfigError, load_config
    from lorasmith.train.flow_checks import check_flow_preset

    for key, words in (("split_qkv", "network.split_qkv is a Flux.1 setting; SDXL has no fused q/k/v layers"),
                       ("train_t5xxl", "network.train_t5xxl is a Flux.1 setting; SDXL has no T5-XXL")):
        config = Config()
        setattr(config.network, key, True)
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_flow_preset(family_named("sdxl"), config)
        check_flow_preset(family_named("flux"), config)
    data, _ = flux_data
    with pytest.raises(ConfigError, match=r"p\.toml: network\.train_t5xxl trains T5-XXL at optimizer\.text_encoder_lr, "
                                          r"which is 0: set it"):
        load_config(preset(tmp_path, tiny_flux, data, network={"train_t5xxl": True}))


def test_t5xxl_adapters_are_kohya_named_and_load_and_merge_as_trained(tiny_flux, flux_data, tmp_path):
    """train_t5xxl: T5-XXL's attention and gated MLP layers of every block take adapters, written as Kohya's
    `lora_te3_…` modules; `lora generate`'s loading gives T5's output as the live encoder gives it (FluxPipeline
    loads CLIP-L alone; T5 takes the adapter beside it), weight 0 gives the base encoder, and merging gives the
    live output too."""
    from diffusers import FluxPipeline
    from transformers import T5EncoderModel

    from lorasmith.lorafile.read import read_lora
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import run
    from lorasmith.use.apply import activate, load_adapters, merge_into

    data, _ = flux_data
    path = preset(tmp_path, tiny_flux, data, network={"train_t5xxl": True},
                  optimizer={"learning_rate": 1e-2, "text_encoder_lr": 1e-2})
    result, _ = run(load_config(path), progress=False, log=lambda message: None)
    file = tmp_path / "out" / "test.safetensors"
    with safe_open(str(file), "pt") as handle:
        modules = {k.split(".")[0] for k in handle.keys()}
        meta = handle.metadata()
    live = result.text_encoders[1].eval()
    blocks = live.config.num_layers
    parts = [f"layer_0_SelfAttention_{x}" for x in "qkvo"]
    parts += [f"layer_1_DenseReluDense_{x}" for x in ("wi_0", "wi_1", "wo")]
    assert {m for m in modules if m.startswith("lora_te3_")} == {
        f"lora_te3_encoder_block_{b}_{part}" for b in range(blocks) for part in parts}
    assert json.loads(meta["ss_network_args"]) == {"train_t5xxl": "True"}

    ids = FluxPipeline.from_pretrained(tiny_flux).tokenizer_2(
        ["claymation style, a blob"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    base = T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2").eval()
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    load_adapters(pipe, {"clay": read_lora(file)})
    with torch.no_grad():
        trained, plain = live(ids)[0], base(ids)[0]
        assert (trained - plain).abs().max() > 1e-3
        activate(pipe, {"clay": 1.0})
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], trained, atol=1e-5, rtol=0)
        activate(pipe, {})
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], plain, atol=1e-6, rtol=0)
        merged = FluxPipeline.from_pretrained(tiny_flux)
        merge_into({"transformer": merged.transformer, "text_encoder": merged.text_encoder,
                    "text_encoder_2": merged.text_encoder_2}, [(read_lora(file), 1.0)])
        torch.testing.assert_close(merged.text_encoder_2(ids)[0], trained, atol=1e-5, rtol=0)


def test_bfl_transformer_file_with_its_own_clip_t5_and_vae_files_trains_as_the_folder(tiny_flux, flux_data, tmp_path,
                                                                                     capsys):
    """The tiny Flux as ComfyUI users keep one (flux1.safetensors in BFL's layout, clip_l, t5xxl and ae files),
    trained offline through the CLI: the same LoRA, bit for bit, as from its diffusers folder. Without the
    companion files, one sentence names the key to set."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, T5EncoderModel

    from lorasmith.models.checkpoint import vae_state_dict
    from lorasmith.models.flux_file import bfl_state_dict

    data, _ = flux_data
    files = tmp_path / "comfy"
    files.mkdir()
    save_file(bfl_state_dict(FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")),
              str(files / "flux1-tiny.safetensors"))
    clip = CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder").state_dict()
    save_file({"text_model." + k.removeprefix("text_model."): v.contiguous() for k, v in clip.items()},
              str(files / "clip_l.safetensors"))
    t5 = T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2").state_dict()
    save_file({k: v.contiguous() for k, v in t5.items() if k != "encoder.embed_tokens.weight"},
              str(files / "t5xxl.safetensors"))
    vae = vae_state_dict(AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae"), prefix="")
    save_file({k: v.contiguous() for k, v in vae.items()}, str(files / "ae.safetensors"))

    env = {"HF_HUB_OFFLINE": "1", "PATH": str(BIN)}
    folder = preset(tmp_path / "a", tiny_flux, data)
    model = {"clip_l": str(files / "clip_l.safetensors"), "t5xxl": str(files / "t5xxl.safetensors"),
             "ae": str(files / "ae.safetensors"), "t5_tokenizer": str(tiny_flux / "tokenizer_2")}
    single = preset(tmp_path / "b", files / "flux1-tiny.safetensors", data, model=model)
    runs = [subprocess.run([BIN / "train-lora", str(p), "--quiet"], capture_output=True, text=True, timeout=300,
                           env=env) for p in (folder, single)]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr[-3000:]
    assert runs[1].stdout.splitlines()[0] == "base model: flux1-tiny.safetensors, a Flux.1 transformer file (BFL's layout)"
    a = load_file(str(tmp_path / "a" / "out" / "test.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "test.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    from lorasmith.train.cli import main

    bare = preset(tmp_path / "c", files / "flux1-tiny.safetensors", data)
    assert main([str(bare), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(
        "train-lora: error: model.clip_l, model.t5xxl, model.ae are empty: a Flux.1 transformer file holds no text "
        "encoders or VAE; set model.clip_l"), err
