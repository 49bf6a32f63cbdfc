"""LoRA files in every layout users bring, put on a tiny base model: on the fly (peft, through diffusers),
merged into the weights, merged with each other, resized — each checked against an independent computation."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loras import attention_and_text, random_modules, write_kohya
from lorasmith.models.base import load_components
from lorasmith.common.prompts import Prompt
from lorasmith.use.apply import activate, layer_table, load_adapters, merge_into
from lorasmith.lorafile.read import LoraError, parse_lora, read_lora
from lorasmith.use.lowrank import concatenate, rank_for_share, resize, svd_merge


def pipeline(folder):
    from diffusers import StableDiffusionPipeline

    parts = load_components(str(folder))
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def outputs(unet, text_encoder):
    """The text encoder's embeddings of a fixed prompt and the UNet's prediction from them."""
    ids = torch.arange(1, 78).unsqueeze(0) % 500
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        emb = text_encoder(ids)[0]
        return emb, unet(sample, 500, encoder_hidden_states=emb).sample


@pytest.fixture(scope="module")
def table(tiny_sd):
    parts = load_components(str(tiny_sd), ("text_encoder", "unet"))
    return layer_table(parts.unet, parts.text_encoder)


@pytest.fixture(scope="module")
def plain(tiny_sd):
    """The table without the original-name aliases: one key per layer, for making files."""
    parts = load_components(str(tiny_sd), ("text_encoder", "unet"))
    return layer_table(parts.unet, parts.text_encoder, aliases=False)


@pytest.fixture(scope="module")
def files(tiny_sd, plain, tmp_path_factory):
    """a: attention + text encoder, rank 4, alpha 2; b: rank 2, alpha 1, UNet only; partial: a Kohya layout
    lorasmith never writes (one attention block under its original name, text encoder named without
    `text_model_`, a 1×1 convolution stored linear-shaped, no alphas)."""
    root = tmp_path_factory.mktemp("loras")
    a = write_kohya(root / "a.safetensors", random_modules(plain, 1, 4, attention_and_text), 2.0)
    b = write_kohya(root / "b.safetensors", random_modules(plain, 2, 2, lambda k: "attn" in k), 1.0)
    chosen = random_modules(plain, 3, 3, lambda k: k.startswith("lora_unet_up_blocks_1_attentions_0")
                            or k == "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    chosen = {k: (d.flatten(1), u.flatten(1)) if k.endswith("proj_in") else (d, u) for k, (d, u) in chosen.items()}
    assert plain["lora_unet_up_blocks_1_attentions_0_proj_in"].shape == (32, 32, 1, 1)  # linear-shaped in the file
    partial = write_kohya(root / "partial.safetensors", chosen,
                          None, rename=lambda k: k.replace("lora_te_text_model_", "lora_te_")
                          .replace("lora_unet_up_blocks_1_attentions_0_", "lora_unet_output_blocks_2_1_"))
    return {"a": a, "b": b, "partial": partial}


def test_the_layer_table_names_kohya_keys_for_every_adapted_layer(table):
    assert table["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].shape == (32, 32)
    assert table["lora_te_text_model_encoder_layers_2_mlp_fc1"].shape == (37, 32)
    assert table["lora_unet_down_blocks_0_resnets_0_conv1"].shape == (32, 32, 3, 3)
    assert not [k for k in table if "lora_te" in k and "embeddings" in k]


def test_original_block_names_point_at_the_same_layers(table):
    """The tiny UNet numbered by hand as the original code does: input 0 conv_in, 1 = down 0 layer 0 (+ its
    attention at .1), 2 its downsampler, 3 = down 1; output 0-1 = up 0 (upsampler at 1.1), 2-3 = up 1."""
    for original, path in [("input_blocks_1_1_proj_in", "down_blocks.0.attentions.0.proj_in"),
                           ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
                           ("input_blocks_2_0_op", "down_blocks.0.downsamplers.0.conv"),
                           ("input_blocks_3_0_out_layers_3", "down_blocks.1.resnets.0.conv2"),
                           ("output_blocks_1_1_conv", "up_blocks.0.upsamplers.0.conv"),
                           ("output_blocks_3_1_transformer_blocks_0_attn2_to_k",
                            "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
                           ("middle_block_1_proj_out", "mid_block.attentions.0.proj_out"),
                           ("middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj")]:
        assert table["lora_unet_" + original].path == path


def test_a_partial_kohya_layout_loads_and_matches_the_merged_weights(tiny_sd, files):
    lora = read_lora(files["partial"])
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lora.modules  # name completed
    assert any(k.startswith("lora_unet_output_blocks_2_1_") for k in lora.modules)
    assert all(m.alpha == m.rank for m in lora.modules.values())  # no .alpha: scale 1, as Kohya's loaders
    live, merged = pipeline(tiny_sd), pipeline(tiny_sd)
    base = outputs(live.unet, live.text_encoder)
    load_adapters(live, {"p": lora})
    activate(live, {"p": 1.0})
    assert merge_into({"unet": merged.unet, "text_encoder": merged.text_encoder}, [(lora, 1.0)]) == len(lora.modules)
    for on_the_fly, baked, before in zip(outputs(live.unet, live.text_encoder), outputs(merged.unet, merged.text_encoder), base):
        assert (on_the_fly - before).abs().max() > 1e-3  # the LoRA does something
        torch.testing.assert_close(on_the_fly, baked, atol=1e-5, rtol=0)


def test_weights_add_up_and_zero_is_the_base_model_exactly(tiny_sd, files):
    a, b = read_lora(files["a"]), read_lora(files["b"])
    live = pipeline(tiny_sd)
    base = outputs(live.unet, live.text_encoder)
    load_adapters(live, {"a": a, "b": b})
    activate(live, {"a": 0.0})
    assert all(torch.equal(x, y) for x, y in zip(outputs(live.unet, live.text_encoder), base))
    activate(live, {"a": 0.7, "b": -0.4})
    mixed = outputs(live.unet, live.text_encoder)
    activate(live, {})
    assert all(torch.equal(x, y) for x, y in zip(outputs(live.unet, live.text_encoder), base))
    merged = pipeline(tiny_sd)
    merge_into({"unet": merged.unet, "text_encoder": merged.text_encoder}, [(a, 0.7), (b, -0.4)])
    for x, y in zip(mixed, outputs(merged.unet, merged.text_encoder)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_diffusers_and_kohya_files_of_one_adapter_describe_the_same_delta(tiny_sd, tmp_path):
    """One peft adapter saved by diffusers' save_lora_weights and by train-lora's Kohya export: both read back
    to the ΔW peft itself computes (get_delta_weight)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from lorasmith.lorafile.export import kohya_state_dict
    from lorasmith.train.network import add_text_lora, add_unet_lora, lora_layers

    parts = load_components(str(tiny_sd), ("text_encoder", "unet"))
    add_unet_lora(parts.unet, 4, 4.0)
    add_text_lora(parts.text_encoder, 4, 4.0)
    torch.manual_seed(0)
    for model in (parts.unet, parts.text_encoder):
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    save_file(kohya_state_dict(parts.unet, parts.text_encoder), str(tmp_path / "k.safetensors"))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(parts.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(parts.text_encoder),
                                              weight_name="d.safetensors")
    kohya, diffusers = read_lora(tmp_path / "k.safetensors"), read_lora(tmp_path / "d.safetensors")
    assert diffusers.format == "diffusers" and kohya.modules.keys() == diffusers.modules.keys()
    table = layer_table(parts.unet, parts.text_encoder)
    peft_deltas = {}
    for component, model in (("unet", parts.unet), ("text_encoder", parts.text_encoder)):
        for path, layer in lora_layers(model).items():
            peft_deltas[(component, path)] = layer.get_delta_weight("default")
    for key, module in kohya.modules.items():
        layer = table[key]
        expected = peft_deltas[(layer.component, layer.path)]
        torch.testing.assert_close(module.delta(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(diffusers.modules[key].delta(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case, words", [
    ("sd2", ["sd2.safetensors does not fit this base model", "wrong shape", "1024", "made for SD2.x"]),
    ("sdxl", ["sdxl.safetensors does not fit this base model", "name no layer",
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "made for SDXL"]),
])
def test_a_file_for_another_model_is_one_sentence_and_changes_nothing(tiny_sd, table, files, tmp_path, case, words):
    if case == "sd2":
        modules = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
                   (torch.zeros(4, 1024), torch.zeros(32, 4))}
        path = write_kohya(tmp_path / "sd2.safetensors", modules, metadata={"ss_base_model_version": "sd_v2"})
    else:
        modules = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (torch.zeros(4, 640), torch.zeros(640, 4)),
                   "lora_te2_text_model_encoder_layers_0_mlp_fc1": (torch.zeros(4, 1280), torch.zeros(5120, 4))}
        path = write_kohya(tmp_path / "sdxl.safetensors", modules, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    live = pipeline(tiny_sd)
    with pytest.raises(LoraError) as caught:
        load_adapters(live, {"good": read_lora(files["a"]), "bad": read_lora(path)})
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not live.get_list_adapters() or not any(live.get_list_adapters().values())  # nothing half-loaded


def test_loha_and_lokr_are_read_as_exact_lora_factors():
    """Each module's ΔW from the exact factors equals the LyCORIS formula computed here from the raw tensors;
    3×3 convolutions come back in their 4-D layout."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    t = {  # module: its LyCORIS tensors
        "lora_unet_a_to_q": {"hada_w1_a": r(6, 2), "hada_w1_b": r(2, 5), "hada_w2_a": r(6, 2), "hada_w2_b": r(2, 5),
                             "alpha": torch.tensor(1.0)},
        "lora_unet_b_to_k": {"lokr_w1": r(2, 3), "lokr_w2_a": r(3, 2), "lokr_w2_b": r(2, 4),
                             "alpha": torch.tensor(1.0)},
        "lora_unet_c_to_v": {"lokr_w1": r(2, 3), "lokr_w2": r(3, 4), "alpha": torch.tensor(7.0)},
        conv: {"hada_w1_a": r(6, 2), "hada_w1_b": r(2, 36), "hada_w2_a": r(6, 2), "hada_w2_b": r(2, 36),
               "alpha": torch.tensor(4.0)},
        "lora_unet_down_blocks_0_downsamplers_0_conv": {"lokr_w1": r(2, 2), "lokr_w2_a": r(3, 2),
                                                        "lokr_w2_b": r(2, 18)},
    }
    expected = {
        "lora_unet_a_to_q": (t["lora_unet_a_to_q"]["hada_w1_a"] @ t["lora_unet_a_to_q"]["hada_w1_b"])
        * (t["lora_unet_a_to_q"]["hada_w2_a"] @ t["lora_unet_a_to_q"]["hada_w2_b"]) * 0.5,
        "lora_unet_b_to_k": torch.kron(t["lora_unet_b_to_k"]["lokr_w1"],
                                       t["lora_unet_b_to_k"]["lokr_w2_a"] @ t["lora_unet_b_to_k"]["lokr_w2_b"]) * 0.5,
        "lora_unet_c_to_v": torch.kron(t["lora_unet_c_to_v"]["lokr_w1"], t["lora_unet_c_to_v"]["lokr_w2"]),  # whole: 1
        conv: ((t[conv]["hada_w1_a"] @ t[conv]["hada_w1_b"]) * (t[conv]["hada_w2_a"] @ t[conv]["hada_w2_b"]) * 2.0
               ).reshape(6, 4, 3, 3),
    }
    sampler = t["lora_unet_down_blocks_0_downsamplers_0_conv"]  # no alpha: alpha = rank, scale 1
    w2 = (sampler["lokr_w2_a"] @ sampler["lokr_w2_b"]).reshape(3, 2, 3, 3)
    expected["lora_unet_down_blocks_0_downsamplers_0_conv"] = torch.kron(sampler["lokr_w1"][:, :, None, None], w2)
    lora = parse_lora({f"{name}.{suffix}": v for name, parts in t.items() for suffix, v in parts.items()}, {},
                      "x.safetensors")
    for name, want in expected.items():
        module = lora.modules[name]
        assert module.weight_shape == tuple(want.shape), name
        torch.testing.assert_close(module.delta(), want, atol=1e-5, rtol=0)
    assert lora.modules["lora_unet_a_to_q"].rank == 4 and lora.modules["lora_unet_b_to_k"].rank == 4  # r1·r2
    assert [lora.modules[n].kind for n in ("lora_unet_a_to_q", "lora_unet_b_to_k")] == ["LoHa", "LoKr"]
    assert not lora.modules["lora_unet_down_blocks_0_downsamplers_0_conv"].alpha_given


@pytest.mark.parametrize("tensors, words", [
    ({"lora_unet_x.hada_t1": torch.zeros(1), "lora_unet_x.hada_w1_b": torch.zeros(1)},
     ["LoHa with Tucker convolutions", "reads LoRA, LoCon, LoHa and LoKr"]),
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 1), "lora_unet_x.hada_w1_b": torch.zeros(1, 2)},
     ["lora_unet_x lacks its hada_w2_a", "incomplete"]),
    ({"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2_a": torch.zeros(2, 1)},
     ["lacks its lokr_w2 (or lokr_w2_a and lokr_w2_b)"]),
    ({"lora_unet_a_b.lora_down.weight": torch.zeros(2, 3)}, ["lacks its lora_up", "incomplete"]),
    ({"model.diffusion_model.out.0.weight": torch.zeros(2)}, ["full checkpoint", "--model"]),
    ({"something_else": torch.zeros(2)}, ["not a Kohya LoRA key"]),
    ({"unet.down_blocks.0.attn.lora_A.weight": torch.zeros(2, 3)}, ["only lora_A"]),
])
def test_unreadable_content_is_named(tensors, words):
    with pytest.raises(LoraError) as caught:
        parse_lora(tensors, {}, "x.safetensors")
    assert str(caught.value).startswith("x.safetensors") and all(w in str(caught.value) for w in words), caught.value


def test_resize_to_full_rank_is_exact_and_lower_ranks_keep_what_svd_says(files):
    lora = read_lora(files["a"])
    full, report = resize(lora, 4)
    for key, module in lora.modules.items():
        torch.testing.assert_close(full.modules[key].delta(), module.delta(), atol=1e-5, rtol=0)
        assert full.modules[key].scale == pytest.approx(module.scale)  # strengths keep their meaning
    assert min(k.share for k in report) > 1 - 1e-6
    low, report = resize(lora, 2)
    for kept in report:
        delta = lora.modules[kept.key].delta().flatten(1)
        u, s, vh = torch.linalg.svd(delta.double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert kept.share == pytest.approx(float(s[:2].norm() / s.norm()), abs=1e-5)
        torch.testing.assert_close(low.modules[kept.key].delta().double().flatten(1), best, atol=1e-5, rtol=0)
        assert low.modules[kept.key].rank == 2


@pytest.mark.parametrize("singular, share, cap, rank", [
    ([3.0, 4.0 * 0, 0.0], 0.99, 8, 1),        # all energy in the first value
    ([1.0, 1.0, 1.0, 1.0], 0.5, 8, 1),        # sqrt(1/4) = 0.5 reached at rank 1
    ([1.0, 1.0, 1.0, 1.0], 0.75, 8, 3),       # sqrt(2/4) = 0.71 < 0.75 <= sqrt(3/4) = 0.87
    ([1.0, 1.0, 1.0, 1.0], 1.0, 8, 4),
    ([1.0, 1.0, 1.0, 1.0], 1.0, 2, 2),        # capped by --rank
    ([0.0, 0.0], 0.9, 8, 1),                  # an untrained module keeps rank 1
])
def test_rank_for_share(singular, share, cap, rank):
    assert rank_for_share(torch.tensor(singular), share, cap) == rank


def test_dynamic_resize_of_a_locon_keeps_each_modules_share(plain):
    modules = random_modules(plain, 5, 4, lambda k: k.endswith(("resnets_0_conv1", "attn1_to_q")))
    lora = parse_lora({**{f"{k}.lora_down.weight": d for k, (d, _) in modules.items()},
                       **{f"{k}.lora_up.weight": u for k, (_, u) in modules.items()}}, {}, "locon.safetensors")
    assert any(m.down.dim() == 4 and m.down.shape[2:] == (3, 3) for m in lora.modules.values())
    small, report = resize(lora, 4, share=0.9)
    for kept in report:
        assert kept.share >= 0.9 - 1e-6 and kept.rank_after <= 4
        assert small.modules[kept.key].delta().shape == lora.modules[kept.key].delta().shape


def test_merging_loras_concatenates_exactly_and_svd_at_full_rank_agrees(files, tmp_path):
    from lorasmith.use.merge import lora_metadata, write_lora

    a, b = read_lora(files["a"]), read_lora(files["b"])
    merged = concatenate([(a, 0.7), (b, -0.5)], "ab.safetensors")
    svd, report = svd_merge([(a, 0.7), (b, -0.5)], "ab.safetensors", 6)
    for key in a.modules.keys() | b.modules.keys():
        expected = sum(w * l.modules[key].delta() for l, w in ((a, 0.7), (b, -0.5)) if key in l.modules)
        torch.testing.assert_close(merged.modules[key].delta(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(svd.modules[key].delta(), expected, atol=1e-5, rtol=0)
    write_lora(tmp_path / "ab.safetensors", merged, lora_metadata(merged, [(a, 0.7), (b, -0.5)], "concat"))
    again = read_lora(tmp_path / "ab.safetensors")
    key = next(iter(a.modules.keys() & b.modules.keys()))
    assert again.modules[key].rank == 6
    torch.testing.assert_close(again.modules[key].delta(), merged.modules[key].delta(), atol=1e-6, rtol=0)
    sources = json.loads(again.metadata["lorasmith_sources"])
    assert [(s["file"], s["weight"]) for s in sources] == [("a.safetensors", 0.7), ("b.safetensors", -0.5)]
    assert str(tmp_path) not in json.dumps(again.metadata)


def test_merged_checkpoint_and_folder_equal_the_loras_applied_on_the_fly(tiny_sd, files, tmp_path, monkeypatch):
    """Single file through diffusers' from_single_file (config from the local folder) and the diffusers folder
    both give the live adapters' outputs within 1e-4 in fp32."""
    from diffusers import StableDiffusionPipeline

    from lorasmith.use.merge import merge_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loras = [(read_lora(files["a"]), 0.8), (read_lora(files["b"]), -0.5)]
    live = pipeline(tiny_sd)
    load_adapters(live, {"a": loras[0][0], "b": loras[1][0]})
    activate(live, {"a": 0.8, "b": -0.5})
    expected = outputs(live.unet, live.text_encoder)
    single, changed = merge_checkpoint(str(tiny_sd), loras, tmp_path / "merged.safetensors", "checkpoint", torch.float32)
    assert changed == len(loras[0][0].modules.keys() | loras[1][0].modules.keys())
    folder, _ = merge_checkpoint(str(tiny_sd), loras, tmp_path / "merged", "diffusers", torch.float32)
    from_file = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_sd), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    from_folder = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    for loaded in (from_file, from_folder):
        for x, y in zip(outputs(loaded.unet, loaded.text_encoder), expected):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    from lorasmith.use.render import Renderer

    prompt = Prompt("a fox", width=64, height=64, steps=3)
    on_the_fly = Renderer(str(tiny_sd), {"a": loras[0][0], "b": loras[1][0]}).draw(prompt, 2, {"a": 0.8, "b": -0.5}, "ddim")
    baked = Renderer(str(folder), {}).draw(prompt, 2, {}, "ddim")
    assert np.abs(np.asarray(on_the_fly).astype(int) - np.asarray(baked).astype(int)).max() <= 1  # 8-bit pixels
    with safe_open(str(single), framework="pt") as handle:
        metadata = handle.metadata()
    assert [s["file"] for s in json.loads(metadata["lorasmith_merged_loras"])] == ["a.safetensors", "b.safetensors"]
    assert str(tmp_path) not in json.dumps(metadata) and metadata["lorasmith_base_model"] == tiny_sd.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_one_layer_named_twice_is_refused(table):
    from lorasmith.use.apply import bind

    pair = (torch.zeros(2, 32), torch.zeros(32, 2))
    tensors = {}
    for key in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_1_1_proj_in"):
        tensors.update({f"{key}.lora_down.weight": pair[0], f"{key}.lora_up.weight": pair[1]})
    with pytest.raises(LoraError, match=r"^twice.safetensors holds two modules for one layer \(.*proj_in and .*proj_in\)"):
        bind(parse_lora(tensors, {}, "twice.safetensors"), table)


def test_a_locon_file_on_the_fly_equals_its_merged_weights(tiny_sd, plain):
    """3×3 ResNet convolutions (Kohya's conv_dim) go through peft's conv adapters like the linear ones."""
    modules = random_modules(plain, 5, 4, lambda k: "resnets" in k and k.endswith(("conv1", "conv2")))
    tensors = {}
    for key, (down, up) in modules.items():
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
    lora = parse_lora(tensors, {}, "locon.safetensors")
    assert all(m.down.shape[2:] == (3, 3) for m in lora.modules.values())
    live, merged = pipeline(tiny_sd), pipeline(tiny_sd)
    load_adapters(live, {"c": lora})
    activate(live, {"c": 0.6})
    merge_into({"unet": merged.unet, "text_encoder": merged.text_encoder}, [(lora, 0.6)])
    for x, y in zip(outputs(live.unet, live.text_encoder), outputs(merged.unet, merged.text_encoder)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_a_loha_file_on_the_fly_is_the_base_plus_its_formula(tiny_sd, plain):
    """A LoHa (attention, text encoder and 3×3 ResNet convolutions) loaded for generation changes the model
    by exactly weight · (w1a·w1b) ⊙ (w2a·w2b) · alpha / r, computed here from the raw tensors."""
    generator = torch.Generator().manual_seed(11)
    tensors, chosen = {}, {k: v for k, v in plain.items()
                           if attention_and_text(k) or ("resnets" in k and k.endswith(("conv1", "conv2")))}
    for key, layer in chosen.items():
        out, fan_in = layer.shape[0], int(np.prod(layer.shape[1:]))
        for name, shape in (("hada_w1_a", (out, 2)), ("hada_w1_b", (2, fan_in)), ("hada_w2_a", (out, 2)),
                            ("hada_w2_b", (2, fan_in))):
            tensors[f"{key}.{name}"] = torch.randn(*shape, generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    lora = parse_lora(tensors, {}, "loha.safetensors")
    live, merged = pipeline(tiny_sd), pipeline(tiny_sd)
    load_adapters(live, {"h": lora})
    activate(live, {"h": 0.6})
    with torch.no_grad():
        for key, layer in chosen.items():
            t = {n: tensors[f"{key}.{n}"] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
            change = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.5 * 0.6
            model = merged.unet if layer.component == "unet" else merged.text_encoder
            weight = model.get_submodule(layer.path).weight
            weight += change.reshape(weight.shape)
    fresh = pipeline(tiny_sd)
    base = outputs(fresh.unet, fresh.text_encoder)
    for x, y, b in zip(outputs(live.unet, live.text_encoder), outputs(merged.unet, merged.text_encoder), base):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        assert float((x - b).abs().max()) > 1e-3  # the LoHa changed something
