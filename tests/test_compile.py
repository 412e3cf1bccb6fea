"""`Pipeline.compile()`: torch.compile of the UNet (Inductor on CPU here), against the eager pipeline.

One compile for the whole suite (~35-50 s of CPU for the tiny UNet at one size): the compiled pipeline
is module-scoped and every test here runs it at 64x64, batch 1 with CFG (UNet batch 2), so only the
first call compiles. Compilations are counted with dynamo's own counters, and later calls run under
`torch.compiler.set_stance("fail_on_recompile")`, which raises instead of recompiling.

Measured (torch 2.13, tiny checkpoint, 64x64, DPM++ 2M Karras, 3 steps): latents rel err
max|Δ|/max|ref| 4.1e-6 against the eager fast path, pixels max |Δ| 1 on 0.06% of the values.
Bounds: latents 1e-4, pixels max |Δ| <= 1 and >= 99% identical.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import sd15
from reference import rel_err

CXX = os.environ.get("CXX", "g++")   # the compiler Inductor's C++ backend calls (torch._inductor.config.cpp.cxx)
pytestmark = pytest.mark.skipif(shutil.which(CXX) is None,
                                reason=f"Inductor compiles C++ kernels on CPU and no C++ compiler ({CXX}) was found")

SIZE = dict(width=64, height=64)
LATENT_TOL = 1e-4
PIXEL_IDENTICAL = 0.99


def generate(pipe, **kwargs):
    """(latents after each step, uint8 pixels) of one txt2img."""
    steps = []
    settings = dict(prompt="a cat", steps=3, sampler="DPM++ 2M Karras", seed=7, **SIZE) | kwargs
    images = pipe.txt2img(progress=lambda i, n, x: steps.append(x), **settings)
    return steps, np.stack([np.asarray(im) for im in images]).astype(int)


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def eager(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


@pytest.fixture(scope="module")
def compiled(tiny_ckpt_file, one_thread):
    """A pipeline after `.compile()`; dynamo's caches and counters are cleared before and after."""
    torch._dynamo.reset()
    counters.clear()
    pipe = sd15.load(tiny_ckpt_file, device="cpu")
    assert pipe.compile() is pipe
    yield pipe
    torch._dynamo.reset()
    counters.clear()


def check_close(ours, ref):
    (steps, pixels), (ref_steps, ref_pixels) = ours, ref
    assert len(steps) == len(ref_steps)
    for x, x_ref in zip(steps, ref_steps):
        assert rel_err(x, x_ref) <= LATENT_TOL
    diff = np.abs(pixels - ref_pixels)
    assert diff.max() <= 1 and (diff == 0).mean() >= PIXEL_IDENTICAL


def test_compiled_matches_eager_and_compiles_once(compiled, eager):
    check_close(generate(compiled), generate(eager))
    assert graphs_compiled() == 1                 # the UNet, as one graph (fullgraph=True): compile did run


def test_same_size_does_not_recompile(compiled, eager):
    generate(compiled)                            # compiles here only if this test runs alone
    before = graphs_compiled()
    assert before >= 1
    other = dict(prompt="a dog", negative_prompt="blurry", seed=11, steps=4, sampler="euler_a", guidance_scale=5.0)
    with torch.compiler.set_stance("fail_on_recompile"):
        ours = generate(compiled, **other)        # new prompt, seed, steps, sampler, scale: same shapes
    assert graphs_compiled() == before
    check_close(ours, generate(eager, **other))


def test_new_size_would_recompile(compiled):
    """The guard above is live: a different image size needs a new graph, and the stance refuses it."""
    generate(compiled)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="recompile"):
        generate(compiled, width=32, height=32)


def test_on_the_fly_deltas_with_a_compiled_unet_are_an_error(tiny_ckpt_file):
    """torch.compile cannot trace the context variable that carries on-the-fly deltas: rather than run
    without them, the pipeline refuses, before any model work."""
    from sd15.models.blocks import deltas_active
    pipe = sd15.load(tiny_ckpt_file, device="cpu")
    pipe.compile()                       # compiles lazily, at the first call: none happens here
    try:
        with deltas_active({pipe.unet.conv_in: [lambda x: 0]}):
            with pytest.raises(ValueError, match="compiled UNet does not see on-the-fly weight deltas"):
                pipe.txt2img("a cat", steps=1, width=32, height=32, seed=1)
    finally:
        torch._dynamo.reset()
