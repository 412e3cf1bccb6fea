"""`sd15.Request`: defaults, normalisation, the checks made when a request is made, and what follows
from it (per-image prompts, the resolved seed). Infotexts: test_infotext.py; the checks as the Python
API and the CLI surface them: test_pipeline.py and test_cli.py."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sd15 import Request
from sd15.pipeline import Pixels
from sd15.pipeline.images import ImageError


def test_defaults_and_canonical_names():
    r = Request("a cat")
    assert (r.size, r.steps, r.sampler, r.guidance_scale, r.seed, r.batch_size, r.strength) == (
        (512, 512), 25, "dpmpp_2m_karras", 7.5, None, 1, 1.0)
    assert Request("a", width=640).size == (640, 512)                     # an unset side is 512
    assert Request("a cat", sampler="Euler a") == Request("a cat", sampler="euler_a")
    assert isinstance(Request("a", guidance_scale=7).guidance_scale, float)


def test_sampler_options_drop_defaults_so_the_sampler_can_change():
    r = Request("a cat", sampler="ddim", sampler_options={"eta": 0.0})
    assert dict(r.sampler_options) == {}
    assert dataclasses.replace(r, sampler="euler").sampler == "euler"     # no stale eta to refuse
    with pytest.raises(ValueError, match="has no option eta"):
        Request("a cat", sampler="euler", sampler_options={"eta": 0.5})
    with pytest.raises(TypeError):
        Request("a", sampler="ddim", sampler_options={"eta": 0.5}).sampler_options["eta"] = 1.0   # read-only


def test_replace_checks_again():
    r = Request("a cat", seed=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        dataclasses.replace(r, width=500)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.steps = 3


def test_per_image_prompts_in_diffusers_order_and_the_batch_limit():
    r = Request(["a", "b"], negative_prompt=["x", "y"], batch_size=2)
    assert r.num_images == 4 and r.per_image() == (["a", "a", "b", "b"], ["x", "x", "y", "y"])
    assert Request(["a", "b"], negative_prompt="n").per_image()[1] == ["n", "n"]
    with pytest.raises(ValueError, match="images in one batch"):
        Request(["p"] * 33, batch_size=2)
    with pytest.raises(ValueError, match="prompt must be a string"):
        Request([])


def test_with_seed_fixes_a_random_seed_once():
    r = Request("a cat")
    fixed = r.with_seed()
    assert isinstance(fixed.seed, int) and 0 <= fixed.seed < 2**32 and fixed.with_seed() is fixed
    assert dataclasses.replace(fixed, seed=None) == r


def gradient(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8))


def test_img2img_size_comes_from_the_image_or_resizes_it():
    r = Request("a cat", init_image=gradient(45, 31))
    assert (r.size, r.strength) == ((40, 24), 0.75)                        # rounded down to x8, default strength
    resized = Request("a cat", init_image=gradient(45, 31), width=64, height=32)
    assert resized.size == (64, 32) and resized.init_image.size == (64, 32)
    expected = np.asarray(gradient(45, 31).resize((64, 32), resample=Image.LANCZOS), dtype=np.float32) / 127.5 - 1
    assert np.allclose(resized.init_image.tensor[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="both width and height"):
        Request("a cat", init_image=gradient(40, 24), width=64)
    with pytest.raises(ImageError, match="resize the tensor"):
        Request("a cat", init_image=torch.rand(3, 24, 40), width=64, height=32)


def test_replace_keeps_the_image_s_own_size_and_resizes_from_the_original():
    """An unset size follows the image; a new size is made from the image the user gave, not a copy."""
    txt = Request("a cat", seed=1)
    assert dataclasses.replace(txt, init_image=gradient(64, 40)).size == (64, 40)
    img = Request("a cat", init_image=gradient(64, 40))
    assert dataclasses.replace(img, init_image=gradient(32, 16)).size == (32, 16)
    small = dataclasses.replace(img, width=32, height=24)
    direct = Request("a cat", init_image=gradient(64, 40), width=32, height=24)
    assert small.size == (32, 24) and small.init_image == direct.init_image       # resized from the original
    back = dataclasses.replace(small, width=64, height=40)
    assert back.init_image == img.init_image                                     # not a blurred round trip


def test_latents_are_txt2img_only_and_the_request_s_own():
    noise = torch.zeros(1, 4, 8, 8)
    r = Request("a cat", width=64, height=64, latents=noise)
    noise += 1                                                                 # the caller reuses its tensor
    assert torch.equal(r.latents, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="img2img starts from its init image"):
        Request("a cat", init_image=gradient(64, 64), latents=torch.zeros(1, 4, 8, 8))
    image = torch.rand(3, 16, 16)
    req = Request("a cat", init_image=image)
    image.fill_(0.5)
    assert not torch.equal(req.init_image.tensor, torch.zeros(1, 3, 16, 16))      # a copy, not a view


def test_strength_needs_an_init_image():
    with pytest.raises(ValueError, match="needs an init image"):
        Request("a cat", strength=0.5)


def test_the_init_image_is_read_once_and_compares_by_value():
    r = Request("a cat", init_image=torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert isinstance(r.init_image, Pixels) and r.init_image.tensor.min() < 0      # in [-1, 1] now
    again = dataclasses.replace(r, seed=3)
    assert again.init_image is r.init_image                                     # not converted twice
    other = Request("a cat", init_image=torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert r != other and r == dataclasses.replace(again, seed=None)


def test_pickle_round_trip():
    """Worker processes and Ray ship requests by pickle."""
    r = Request(["a", "b"], sampler="ddim", sampler_options={"eta": 0.25}, seed=5,
                init_image=torch.rand(2, 3, 16, 16), strength=0.5)
    back = pickle.loads(pickle.dumps(r))
    assert back == r and dict(back.sampler_options) == {"eta": 0.25}
