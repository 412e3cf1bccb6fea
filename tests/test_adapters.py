"""LoRA plumbing that is not parity with diffusers (that is test_lora_parity.py): A1111's tag and CLI
forms, names found in LoRA folders, the diffusers -> LDM block numbering, the infotext fields, and LoRA
generations on several threads beside plain ones."""

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sd15
from sd15.adapters import LoraSpec, Loras, spec_from_tag
from sd15.adapters.names import diffusers_to_ldm, module_index, split_key
from sd15.models.config import TextEncoderConfig, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- A1111's <lora:...> and the CLI's FILE:W:UNET_W --------------------------------------------------

@pytest.mark.parametrize("args,expected", [          # extra_networks_lora.py: te first, then unet
    (("x",), (1.0, 1.0, None)),
    (("x", "0.8"), (0.8, 0.8, None)),
    (("x", "0.8", "0.3"), (0.8, 0.3, None)),
    (("x", "1", "0.5", "16"), (1.0, 0.5, 16)),
    (("x", "te=0.2"), (0.2, 0.2, None)),
    (("x", "0.9", "unet=0.1"), (0.9, 0.1, None)),
    (("x", "-1"), (-1.0, -1.0, None)),
])
def test_tag_strengths(args, expected):
    spec = spec_from_tag(args)
    assert (spec.name, spec.te, spec.unet, spec.dyn) == ("x", *expected)


def test_bad_tags_and_specs():
    with pytest.raises(ValueError, match="strengths must be numbers"):
        spec_from_tag(("x", "strong"))
    with pytest.raises(ValueError, match="finite"):
        LoraSpec("x", float("nan"))
    assert LoraSpec.parse("style.safetensors") == LoraSpec("style.safetensors", 1.0, 1.0)
    assert LoraSpec.parse("style.safetensors:0.7") == LoraSpec("style.safetensors", 0.7, 0.7)
    assert LoraSpec.parse("dir/style:0.7:0.2") == LoraSpec("dir/style", 0.7, 0.2)
    assert LoraSpec.parse("C:\\loras\\a.pt:0.5") == LoraSpec("C:\\loras\\a.pt", 0.5, 0.5)
    assert LoraSpec.of(("a", 0.5, 0.25)) == LoraSpec("a", 0.5, 0.25) and LoraSpec.of("a") == LoraSpec("a")


# ---- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("diffusers,ldm", [      # A1111's convert_diffusers_name_to_compvis, SD1.5's layout
    ("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k", "input_blocks_2_1_transformer_blocks_0_attn2_to_k"),
    ("down_blocks_2_resnets_1_conv2", "input_blocks_8_0_out_layers_3"),
    ("down_blocks_1_resnets_0_conv_shortcut", "input_blocks_4_0_skip_connection"),
    ("down_blocks_2_downsamplers_0_conv", "input_blocks_9_0_op"),
    ("mid_block_attentions_0_proj_in", "middle_block_1_proj_in"),
    ("mid_block_resnets_1_time_emb_proj", "middle_block_2_emb_layers_1"),
    ("up_blocks_0_resnets_2_conv1", "output_blocks_2_0_in_layers_2"),
    ("up_blocks_0_upsamplers_0_conv", "output_blocks_2_1_conv"),
    ("up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    ("up_blocks_3_attentions_2_proj_out", "output_blocks_11_1_proj_out"),
    ("conv_in", "input_blocks_0_0"), ("conv_out", "out_2"),
    ("time_embedding_linear_1", "time_embed_0"), ("time_embedding_linear_2", "time_embed_2"),
])
def test_diffusers_block_numbering(diffusers, ldm):
    assert diffusers_to_ldm(diffusers, UNetConfig()) == ldm


def test_every_lora_target_of_sd15_is_indexed():
    index = module_index(UNetConfig(), TextEncoderConfig())
    assert index.find("input_blocks_1_1_transformer_blocks_0_attn1_to_q") == ("unet", "down.0.attn.0.block.attn1.to_q")
    assert index.find("text_model_encoder_layers_11_mlp_fc2") == ("text_encoder", "layers.11.mlp.fc2")
    transformer_linears = [k for k in index.modules if "transformer_blocks" in k and ("attn" in k or "ff_net" in k)
                           and "norm" not in k]
    assert len(transformer_linears) == 16 * 10           # 10 per transformer block (proj_in/out are besides)


@pytest.mark.parametrize("key,expected", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
     ("unet", "down_blocks_0_attentions_0_proj_in", "lora_down.weight")),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", ("text_encoder", "text_model_encoder_layers_0_mlp_fc1", "alpha")),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_down.weight")),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "lora_up.weight")),
    ("lora_unet_mid_block_resnets_0_conv1.hada_w1_a", ("unet", "mid_block_resnets_0_conv1", "hada_w1_a")),
    ("model.diffusion_model.out.2.weight", None),
])
def test_key_spellings(key, expected):
    assert split_key(key) == expected


# ---- the library -------------------------------------------------------------------------------------

def test_names_are_found_in_the_folders_only(tmp_path):
    (tmp_path / "styles").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "styles" / "Add_Detail.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "twin.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "styles" / "twin.pt"))
    library = Loras([tmp_path])
    assert library.find("Add_Detail", False).name == "Add_Detail.safetensors"
    assert library.find("add_detail", False).name == "Add_Detail.safetensors"        # case-insensitive fallback
    with pytest.raises(ValueError, match="ambiguous"):
        library.find("twin", False)
    with pytest.raises(ValueError, match="no LoRA named '../twin'"):
        library.find("../twin", False)                     # a tag never names a path
    assert library.find(str(tmp_path / "twin.safetensors"), True).name == "twin.safetensors"
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        Loras([tmp_path / "nope"])


# ---- through the pipeline: tags, infotext, threads ----------------------------------------------------

def tiny_lora(path, seed=0):
    """A kohya-named LoRA on two attention projections and the text encoder's first q_proj."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, width in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32),
                        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", 64),
                        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32)):
        context = 32 if "attn2_to_v" in name else width
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, context, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_pipe(tiny_ckpt_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    tiny_lora(folder / "style.safetensors", 0)
    tiny_lora(folder / "other.safetensors", 1)
    return sd15.load(tiny_ckpt_file, device="cpu", lora_dirs=[folder]), folder


SMALL = dict(steps=2, width=32, height=32, seed=3, sampler="euler")


def pixels(images):
    return np.stack([np.asarray(i) for i in images])


def test_tags_request_loras_and_the_infotext(lora_pipe):
    pipe, folder = lora_pipe
    plain = pixels(pipe.txt2img("a cat", **SMALL))
    tagged = pipe.txt2img("a cat <lora:style:0.8>", **SMALL)
    assert not np.array_equal(pixels(tagged), plain)
    by_request = pipe.generate(sd15.Request("a cat", loras=[(folder / "style.safetensors", 0.8)], **SMALL))
    assert np.array_equal(pixels(by_request), pixels(tagged))           # the tag and the request field agree
    assert np.array_equal(pixels(pipe.txt2img("a cat", **SMALL)), plain)   # and leave the model as it was
    text = by_request[0].info["parameters"]
    back = sd15.Request.from_infotext(text)
    assert back.request == sd15.Request("a cat", loras=[(str(folder / "style.safetensors"), 0.8, 0.8)], **SMALL)
    assert back.lora_hashes == {"style": pipe.loras.load(LoraSpec("style"), module_index(
        pipe.unet.cfg, pipe.text_encoder.cfg), False).hash}
    assert "Lora hashes: \"style: " in tagged[0].info["parameters"]


def test_te_and_unet_strengths_are_separate(lora_pipe):
    pipe, _ = lora_pipe
    both = pixels(pipe.txt2img("a cat <lora:style:1:1>", **SMALL))
    te_only = pixels(pipe.txt2img("a cat <lora:style:1:0>", **SMALL))
    unet_only = pixels(pipe.txt2img("a cat <lora:style:0:1>", **SMALL))
    none = pixels(pipe.txt2img("a cat <lora:style:0:0>", **SMALL))
    assert np.array_equal(none, pixels(pipe.txt2img("a cat", **SMALL)))
    assert len({a.tobytes() for a in (both, te_only, unet_only, none)}) == 4


def test_an_unknown_tag_name_is_a_clear_error(lora_pipe):
    with pytest.raises(ValueError, match="no LoRA named 'nosuch'"):
        lora_pipe[0].txt2img("a cat <lora:nosuch:1>", **SMALL)


def test_lora_and_plain_generations_on_threads(lora_pipe):
    """Merging takes the models alone: a plain generation beside it never sees merged weights."""
    pipe, _ = lora_pipe
    prompts = ["a cat", "a cat <lora:style:0.8>", "a dog", "a cat <lora:other:1>"]
    expected = [pixels(pipe.txt2img(p, **SMALL)) for p in prompts]
    barrier, results, errors = threading.Barrier(len(prompts)), {}, []

    def work(i):
        try:
            barrier.wait()
            results[i] = [pixels(pipe.txt2img(prompts[i], **SMALL)) for _ in range(3)]
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in results.items():
        assert all(np.array_equal(r, expected[i]) for r in runs), prompts[i]


def test_on_the_fly_on_threads_with_different_loras(lora_pipe):
    pipe, _ = lora_pipe
    pipe.lora_mode = "on_the_fly"
    try:
        test_lora_and_plain_generations_on_threads(lora_pipe)
    finally:
        pipe.lora_mode = "merge"
