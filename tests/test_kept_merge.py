"""LoRAs kept merged between generations (A1111's behaviour): the same set again is not merged again,
another set (or none) gets the original weight tensors back first, and every image is the image a fresh
pipeline gives for its request.

Expected images come from a second, freshly loaded pipeline that never kept anything: the same request on
it, bit for bit. Which tensors the modules hold is checked by identity (the merge makes new ones; a
restore puts the loaded ones back).
"""

import os

import numpy as np
import pytest
import torch

from safetensors.torch import save_file

import sd15
from sd15.adapters.names import TEXT, UNET, module_index, our_module
from sd15.models.demo import random_controlnet_state
from sd15.pipeline.control import load_controlnet
from test_adapters import SMALL, pixels, tiny_lora

# Modules tiny_lora touches, by its own (kohya) names.
UNET_NAME, TEXT_NAME = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "encoder_layers_0_self_attn_q_proj"


@pytest.fixture()
def pipes(tiny_ckpt_file, tmp_path):
    tiny_lora(tmp_path / "style.safetensors", 0)
    tiny_lora(tmp_path / "other.safetensors", 1)
    load = lambda: sd15.load(tiny_ckpt_file, device="cpu", lora_dirs=[tmp_path])   # noqa: E731
    return load(), load(), tmp_path


def weights(pipe):
    index = module_index(pipe.unet.cfg, pipe.text_encoder.cfg)
    return (pipe.unet.get_submodule(our_module(index, UNET, UNET_NAME)).weight,
            pipe.text_encoder.get_submodule(our_module(index, TEXT, TEXT_NAME)).weight)


def same_tensors(a, b):
    return all(x is y for x, y in zip(a, b))


def fresh(pipe, prompt, **kw):
    """The request's image on a pipeline that holds the original weights (`pipe` is never given a LoRA)."""
    assert pipe._kept.uses == ()
    return pixels(pipe.txt2img(prompt, **{**SMALL, **kw}))


def test_the_module_names_are_real(pipes):
    pipe, _, _ = pipes
    unet_w, text_w = weights(pipe)
    assert unet_w.shape[0] == 32 and text_w.shape[0] == 32       # tiny_lora's widths for these two


def test_same_set_again_is_not_merged_again(pipes):
    pipe, reference, _ = pipes
    loaded = weights(pipe)
    first = pixels(pipe.txt2img("a cat <lora:style:0.8>", **SMALL))
    merged_weights = weights(pipe)
    assert not any(a is b for a, b in zip(merged_weights, loaded))        # both models carry the LoRA
    second = pixels(pipe.txt2img("a dog <lora:style:0.8>", **SMALL))
    assert same_tensors(weights(pipe), merged_weights)                    # kept, not merged again
    assert np.array_equal(first, fresh_with(reference, "a cat <lora:style:0.8>"))
    assert np.array_equal(second, fresh_with(reference, "a dog <lora:style:0.8>"))


def fresh_with(pipe, prompt):
    """The LoRA image from a pipeline whose last state was the original weights."""
    with pipe.original_weights():
        pass
    return pixels(pipe.txt2img(prompt, **SMALL))


def test_a_plain_generation_gets_the_original_tensors_back(pipes):
    pipe, reference, _ = pipes
    loaded = weights(pipe)
    plain = fresh(reference, "a cat")
    pipe.txt2img("a cat <lora:style:1>", **SMALL)
    assert np.array_equal(pixels(pipe.txt2img("a cat", **SMALL)), plain)
    assert same_tensors(weights(pipe), loaded) and pipe._kept.uses == ()


@pytest.mark.parametrize("second", ["a cat <lora:other:1>", "a cat <lora:style:0.5>", "a cat <lora:style:1:0>",
                                    "a cat <lora:style:1> <lora:other:1>"])
def test_another_set_or_strength_is_merged_from_the_originals(pipes, second):
    pipe, reference, _ = pipes
    pipe.txt2img("a cat <lora:style:1>", **SMALL)
    got = pixels(pipe.txt2img(second, **SMALL))
    assert np.array_equal(got, fresh_with(reference, second))


def test_a_changed_file_is_merged_again(pipes):
    pipe, reference, folder = pipes
    pipe.txt2img("a cat <lora:style:1>", **SMALL)
    tiny_lora(folder / "style.safetensors", 7)                     # new contents under the same name
    stat = os.stat(folder / "style.safetensors")
    os.utime(folder / "style.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    got = pixels(pipe.txt2img("a cat <lora:style:1>", **SMALL))
    assert np.array_equal(got, fresh_with(reference, "a cat <lora:style:1>"))


def test_on_the_fly_mode_runs_on_the_original_weights(pipes):
    pipe, reference, _ = pipes
    loaded = weights(pipe)
    pipe.txt2img("a cat <lora:style:1>", **SMALL)
    pipe.lora_mode = reference.lora_mode = "on_the_fly"
    got = pixels(pipe.txt2img("a cat <lora:other:1>", **SMALL))
    assert same_tensors(weights(pipe), loaded)
    assert np.array_equal(got, pixels(reference.txt2img("a cat <lora:other:1>", **SMALL)))


def test_original_weights_restores_and_a_failed_merge_leaves_the_originals(pipes, tmp_path):
    pipe, _, folder = pipes
    loaded = weights(pipe)
    pipe.txt2img("a cat <lora:style:1>", **SMALL)
    with pipe.original_weights():
        assert same_tensors(weights(pipe), loaded)
    # A LoRA whose shapes do not fit is refused before anything is merged: the originals stay.
    bad = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(4, 7),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(32, 4)}
    save_file(bad, str(folder / "bad.safetensors"))
    pipe.txt2img("a cat <lora:style:1>", **SMALL)
    with pytest.raises(ValueError, match="bad.safetensors"):
        pipe.txt2img("a cat <lora:bad:1>", **SMALL)
    assert same_tensors(weights(pipe), loaded) and pipe._kept.uses == ()


def test_a_difference_controlnet_adds_the_original_unet_weights(pipes, tmp_path, tiny_state_dict):
    """Loaded while a LoRA is kept merged, a "difference" ControlNet still adds the UNet's own weights."""
    pipe, reference, _ = pipes
    unet = "model.diffusion_model."
    control = random_controlnet_state(seed=2)
    delta = {k: (t - tiny_state_dict[unet + k] if unet + k in tiny_state_dict else t).contiguous()
             for k, t in control.items()}
    path = tmp_path / "control_tiny_diff.safetensors"
    save_file({"difference": torch.tensor([1.0])} | {"control_model." + k: t for k, t in delta.items()}, str(path))
    expected = load_controlnet(path, reference).net.state_dict()
    pipe.txt2img("a cat <lora:style:1>", **SMALL)          # merges into down.0's attention, which it copies
    got = load_controlnet(path, pipe).net.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert pipe._kept.uses == ()
