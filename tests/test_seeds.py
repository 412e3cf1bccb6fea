"""Seed modes: diffusers' one generator per call (the default, held to diffusers elsewhere) and A1111's
generator per image, with its variation seeds, seed resize and ENSD.

The A1111 reference here is its published modules/rng.py (ImageRNG.first/next, slerp, randn), written out
again in numpy-free torch below from that description, not from sd15.sampling.seeds.
"""
import numpy as np
import pytest
import torch

import sd15
from sd15.pipeline.request import Request
from sd15.sampling.seeds import A1111Noise

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(steps=3, width=32, height=32)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


def pixels(images):
    return np.stack([np.asarray(i) for i in images])


# ---- the noise source against A1111's rng.py, restated -------------------------------------------------

def a1111_randn(seed, shape):
    torch.manual_seed(seed)               # A1111's randn(seed, shape): the global generator, seeded
    return torch.randn(shape)


def a1111_slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def test_per_image_generators_and_the_ensd_reseed():
    shape = (3, 4, 6, 5)
    noise = A1111Noise([10, 11, 12], seed_delta=31337)
    first = noise.first(shape)
    for i, seed in enumerate((10, 11, 12)):
        assert torch.equal(first[i], a1111_randn(seed, shape[1:]))
    after = noise.draw(shape)          # re-seeded with seed + ENSD after the first draw
    for i, seed in enumerate((10, 11, 12)):
        assert torch.equal(after[i], a1111_randn(seed + 31337, shape[1:]))
    plain = A1111Noise([10, 11, 12])
    plain.first(shape)
    g = torch.Generator().manual_seed(11)
    g_first = torch.randn(shape[1:], generator=g)
    assert torch.equal(plain.draw(shape)[1], torch.randn(shape[1:], generator=g))   # the same stream continues
    assert not torch.equal(g_first, after[1])


def test_variation_seed_is_a1111s_slerp_along_dim_1():
    shape = (2, 4, 8, 6)
    got = A1111Noise([5, 6], subseeds=[70, 71], subseed_strength=0.3).first(shape)
    for i in range(2):
        expected = a1111_slerp(0.3, a1111_randn(5 + i, shape[1:]), a1111_randn(70 + i, shape[1:]))
        assert torch.allclose(got[i], expected, atol=1e-6, rtol=0)
    whole = torch.randn(4, 8, 6)          # a slerp over the whole tensor is another thing: the test can tell
    assert not torch.allclose(a1111_slerp(0.3, whole, whole.flip(0)), 0.7 * whole + 0.3 * whole.flip(0), atol=1e-3)
    same = A1111Noise([5], subseeds=[5], subseed_strength=0.3).first((1, 4, 8, 6))    # parallel: A1111's fallback
    assert torch.allclose(same[0], a1111_randn(5, (4, 8, 6)), atol=1e-6)


def test_seed_resize_pastes_the_small_draw_centred():
    # a 6x5 latent whose noise is drawn as at 56x32 px (7x4 latent): 4 rows pasted from row 0 (dy = 0), the
    # 7 columns cropped to 5 from column 1 (dx = -1: w = 7 - 2), into the image generator's own full draw
    got = A1111Noise([9], resize_from=(56, 32)).first((1, 4, 5, 6))[0]
    small = a1111_randn(9, (4, 4, 7))
    full = torch.randn((4, 5, 6), generator=torch.Generator().manual_seed(9))
    expected = full.clone()
    expected[:, 0:4, 0:5] = small[:, 0:4, 1:6]
    assert torch.equal(got, expected)
    grown = A1111Noise([9], resize_from=(16, 16)).first((1, 4, 6, 6))[0]     # smaller: pasted centred
    assert torch.equal(grown[:, 2:4, 2:4], a1111_randn(9, (4, 2, 2)))
    assert torch.equal(grown[:, 0, :], torch.randn((4, 6, 6), generator=torch.Generator().manual_seed(9))[:, 0, :])


# ---- through the pipeline -----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler_a", "ddpm", "euler", "dpmpp_sde", "dpmpp_2m_sde", "dpm_2_a"])
def test_a1111_image_i_of_a_batch_is_seed_plus_i_alone(pipe, sampler):
    batch = pipe.generate(Request("a fox", seed=40, batch_size=4, sampler=sampler, seed_mode="a1111", **SMALL))
    alone = pipe.generate(Request("a fox", seed=43, sampler=sampler, seed_mode="a1111", **SMALL))
    assert np.array_equal(pixels(batch[3:]), pixels(alone))
    assert [im.info["seed"] for im in batch] == [40, 41, 42, 43]
    assert not np.array_equal(pixels(batch[2:3]), pixels(alone))
    diffusers = pipe.generate(Request("a fox", seed=40, batch_size=4, sampler=sampler, **SMALL))
    assert not np.array_equal(pixels(diffusers[3:]), pixels(alone))     # diffusers' mode: one stream for all


def test_a1111_batch_image_reads_back_alone(pipe):
    batch = pipe.generate(Request("a fox", seed=40, batch_size=3, sampler="euler_a", seed_mode="a1111",
                                  noise_seed_delta=31337, **SMALL))
    text = batch[2].info["parameters"]
    assert "Seed: 42," in text and "Seed mode: a1111" in text and "ENSD: 31337" in text and "Batch pos: 2" in text
    back = Request.from_infotext(text)
    assert (back.request.seed, back.request.batch_size, back.request.noise_seed_delta) == (42, 1, 31337)
    assert np.array_equal(pixels(pipe.generate(back.request)), pixels(batch[2:]))


def test_ensd_changes_ancestral_noise_only(pipe):
    kw = dict(seed=8, seed_mode="a1111", **SMALL)
    for sampler, changes in (("euler_a", True), ("euler", False)):
        a = pixels(pipe.generate(Request("a fox", sampler=sampler, **kw)))
        b = pixels(pipe.generate(Request("a fox", sampler=sampler, noise_seed_delta=31337, **kw)))
        assert (not np.array_equal(a, b)) == changes, sampler


def test_variation_strength_0_and_1(pipe):
    kw = dict(sampler="euler", seed_mode="a1111", **SMALL)
    base = pixels(pipe.generate(Request("a fox", seed=3, **kw)))
    assert np.array_equal(pixels(pipe.generate(Request("a fox", seed=3, subseed=99, subseed_strength=0.0, **kw))), base)
    full = pipe.generate(Request("a fox", seed=3, subseed=99, subseed_strength=1.0, **kw))
    own = pixels(pipe.generate(Request("a fox", seed=99, **kw)))
    assert np.abs(pixels(full).astype(int) - own.astype(int)).max() <= 1     # slerp(1) is the subseed's noise
    half = pipe.generate(Request("a fox", seed=3, subseed=99, subseed_strength=0.5, **kw))
    assert not np.array_equal(pixels(half), base) and not np.array_equal(pixels(half), own)
    text = half[0].info["parameters"]
    assert "Variation seed: 99," in text and "Variation seed strength: 0.5" in text
    assert np.array_equal(pixels(pipe.generate(Request.from_infotext(text).request)), pixels(half))


def test_variation_infotext_round_trip_per_image():
    req = Request("a fox", seed=3, subseed=99, subseed_strength=0.25, batch_size=2, seed_mode="a1111",
                  seed_resize_from=(512, 384), **SMALL)
    assert req.all_seeds == [3, 3] and req.all_subseeds == [99, 100]    # A1111 steps the subseed instead
    back = Request.from_infotext(req.infotext(1)).request
    assert (back.seed, back.subseed, back.subseed_strength, back.seed_resize_from, back.batch_size) == (
        3, 100, 0.25, (512, 384), 1)


def test_a1111_infotexts_read_as_a1111_seeds():
    text = ("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Variation seed: 6, "
            "Variation seed strength: 0.4, Seed resize from: 448x448, Version: v1.10.1")
    r = Request.from_infotext(text).request
    assert (r.seed_mode, r.subseed, r.subseed_strength, r.seed_resize_from) == ("a1111", 6, 0.4, (448, 448))
    ours = Request.from_infotext("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512").request
    assert ours.seed_mode == "diffusers"
    assert Request.from_infotext(text.replace(", Variation seed: 6, Variation seed strength: 0.4, "
                                              "Seed resize from: 448x448", ""),
                                 seed_mode="diffusers").request.seed_mode == "diffusers"


def test_random_subseed_is_picked_when_strength_is_set():
    req = Request("a fox", seed=1, subseed_strength=0.2, seed_mode="a1111").with_seed()
    assert isinstance(req.subseed, int) and req.seed == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed_mode="comfy"), "seed_mode must be one of diffusers, a1111"),
    (dict(subseed_strength=0.5), "subseed_strength shape A1111's per-image noise: set seed_mode='a1111'"),
    (dict(noise_seed_delta=31337), "noise_seed_delta shape A1111's per-image noise"),
    (dict(seed_mode="a1111", subseed_strength=1.5), "subseed_strength must be a number in \\[0, 1\\]"),
    (dict(seed_mode="a1111", subseed=-1), "subseed must be an integer in \\[0, 2\\*\\*64\\)"),
    (dict(seed_mode="a1111", seed_resize_from=(0, 512)), "seed_resize_from must be \\(width, height\\)"),
    (dict(seed_mode="a1111", noise_seed_delta=-3), "ENSD"),
])
def test_bad_seed_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Request("a fox", **kwargs)


def test_euler_a_eta_0_is_euler_and_s_noise_scales_the_noise(pipe):
    kw = dict(seed=6, **SMALL)
    euler = pixels(pipe.generate(Request("a fox", sampler="euler", **kw)))
    assert np.array_equal(pixels(pipe.generate(Request("a fox", sampler="euler_a", sampler_options={"eta": 0},
                                                       **kw))), euler)
    default = pixels(pipe.generate(Request("a fox", sampler="euler_a", **kw)))
    quieter = pipe.generate(Request("a fox", sampler="euler_a", sampler_options={"s_noise": 0.5}, **kw))
    assert not np.array_equal(pixels(quieter), default) and "Sigma noise: 0.5" in quieter[0].info["parameters"]


def test_seeds_past_2_64_are_refused_when_the_request_is_made():
    with pytest.raises(ValueError, match="too large for a batch of 2 in a1111 seed mode"):
        Request("a fox", seed=2**64 - 1, batch_size=2, seed_mode="a1111")
    with pytest.raises(ValueError, match="subseed .* too large"):
        Request("a fox", seed=1, subseed=2**64 - 1, subseed_strength=0.5, batch_size=2, seed_mode="a1111")
    with pytest.raises(ValueError, match="too large"):
        Request("a fox", seed=2**64 - 5, noise_seed_delta=31337, seed_mode="a1111")
    assert Request("a fox", seed=2**64 - 1, batch_size=2).all_seeds == [2**64 - 1] * 2    # diffusers: one seed
