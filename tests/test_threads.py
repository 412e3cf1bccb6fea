"""Re-entrancy: generations on several threads of one `Pipeline` give exactly the images the same
generations give one after the other.

The two paths that used to mutate shared state are both exercised: the fp16 VAE NaN fallback (it
recast the shared VAE in place and back; now a float32 copy is made once, under a lock) and the CPU fast
path's prepacked conv weights (one slot per module, written during forward; now keyed by input shape).
Threads start together at a barrier and each runs its requests several times, so their model calls
interleave. Tiny models, one intra-op thread each (see conftest's `one_thread`), so results are
deterministic and can be compared bit for bit.
"""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import sd15
from sd15.models.demo import tiny_metadata
from sd15.pipeline import vae_io
from tools.make_checkpoint import save

pytestmark = pytest.mark.usefixtures("one_thread")
ROUNDS = 3


@pytest.fixture(scope="module")
def overflowing_fp16_pipe(tiny_state_dict, tmp_path_factory):
    """As in test_pipeline: post_quant_conv's bias of 6e4 makes the fp16 VAE overflow to NaN, not the fp32 one."""
    sd = dict(tiny_state_dict)
    sd["first_stage_model.post_quant_conv.bias"] = torch.full((4,), 6.0e4)
    path = tmp_path_factory.mktemp("fp16-threads") / "overflow.safetensors"
    save(sd, path, metadata=tiny_metadata())
    return sd15.load(path, device="cpu", dtype=torch.float16)


@pytest.fixture(scope="module")
def fp32_pipe(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8))


REQUESTS = [
    sd15.Request("a cat", steps=3, width=32, height=32, sampler="euler_a", seed=1),
    sd15.Request(("a dog", "a fox"), negative_prompt="blurry", steps=4, width=48, height=40,
                 sampler="DPM++ 2M Karras", seed=2),
    sd15.Request("a bird", init_image=gradient(40, 24), strength=0.6, steps=5, sampler="ddim",
                 sampler_options={"eta": 0.5}, seed=3, batch_size=2),
]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def run_concurrently(pipe, requests) -> list[list[np.ndarray]]:
    """Each request on its own thread, ROUNDS times, all threads released at once."""
    barrier = threading.Barrier(len(requests))
    results: list[list[np.ndarray]] = [[] for _ in requests]
    errors = []

    def work(i):
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                results[i].append(pixels(pipe.generate(requests[i])))
        except BaseException as e:          # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("which", ["fp16 with NaN fallback", "fp32 fast path"])
def test_threads_give_the_sequential_images(which, overflowing_fp16_pipe, fp32_pipe, caplog):
    pipe = overflowing_fp16_pipe if which.startswith("fp16") else fp32_pipe
    sequential = [pixels(pipe.generate(r)) for r in REQUESTS]
    concurrent = run_concurrently(pipe, REQUESTS)
    for expected, got in zip(sequential, concurrent):
        assert len(got) == ROUNDS
        for images in got:
            assert np.array_equal(images, expected)
    assert all(img.std() > 5 for img in sequential)                        # real images, not black ones
    if pipe is overflowing_fp16_pipe:
        assert next(pipe.vae.parameters()).dtype == torch.float16           # the shared VAE never changes
        assert vae_io.float32_copy(pipe.vae) is vae_io.float32_copy(pipe.vae)   # one copy, made once
        assert any("NaN" in r.getMessage() for r in caplog.records)


def test_prepacked_weights_are_kept_per_input_shape(fp32_pipe):
    """Two sizes in turn do not repack on every call: each conv keeps both shapes' packed weights."""
    small, large = REQUESTS[0], REQUESTS[1]
    fp32_pipe.generate(small)
    fp32_pipe.generate(large)
    conv = fp32_pipe.unet.conv_in
    packed = dict(conv._packed)
    assert len(packed) == 2
    fp32_pipe.generate(small)
    assert conv._packed.keys() == packed.keys()
    assert all(conv._packed[s][2] is packed[s][2] for s in packed)          # reused, not packed again
