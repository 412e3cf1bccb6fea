"""Shared fixtures. Add fixtures here; keep heavy ones (full SD1.5 size) module-scoped in their test file."""

import pytest
import torch

from reference import TINY, engine_models, pipeline_components, reference_models
from sd15.models.demo import PREFIX, random_state_dict, tiny_metadata
from tools.make_checkpoint import save


@pytest.fixture(scope="session")
def tiny_state_dict():
    """Original-layout random checkpoint for the tiny configs (`reference.TINY`); treat as read-only."""
    return random_state_dict(seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_file(tiny_state_dict, tmp_path_factory):
    """`tiny_state_dict` written as a real .safetensors file (configs in its metadata) for `sd15.load`."""
    path = tmp_path_factory.mktemp("models") / "tiny-model_v1.safetensors"
    save(tiny_state_dict, path, metadata=tiny_metadata())
    return path


@pytest.fixture(scope="session")
def nine_state_dict(tiny_state_dict):
    """The tiny checkpoint with a 9-input-channel first convolution (an SD1 inpainting UNet's shape)."""
    key = PREFIX["unet"] + "input_blocks.0.0.weight"
    sd = dict(tiny_state_dict)
    sd[key] = torch.randn((sd[key].shape[0], 9, 3, 3), generator=torch.Generator().manual_seed(9)) / (9 * 9) ** 0.5
    return sd


@pytest.fixture(scope="session")
def nine_ckpt_file(nine_state_dict, tmp_path_factory):
    """`nine_state_dict` as a .safetensors file; its metadata says 4 channels (the tiny configs): shapes win."""
    path = tmp_path_factory.mktemp("inpaint") / "tiny-inpainting.safetensors"
    save(nine_state_dict, path, metadata=tiny_metadata())
    return path


@pytest.fixture(scope="session")
def inpaint_models(tiny_ckpt_file, nine_ckpt_file, tiny_models, nine_state_dict, reference_tokenizer_files):
    """{4: (our pipeline, diffusers' components), 9: (...)}: an ordinary and an inpainting tiny checkpoint."""
    import dataclasses

    import sd15
    from transformers import CLIPTokenizer as ReferenceTokenizer
    nine = reference_models(nine_state_dict, dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet,
                                                                                                in_channels=9)))
    tokenizer = ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77)
    out = {}
    for channels, path, ref in ((4, tiny_ckpt_file, tiny_models[0]), (9, nine_ckpt_file, nine)):
        pipe = sd15.load(path, device="cpu")
        assert pipe.unet.cfg.in_channels == channels == ref.unet.config.in_channels
        out[channels] = pipe, pipeline_components(ref, tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_state_dict):
    """(reference, ours) `reference.Models` for the tiny configs, sharing `tiny_state_dict`'s tensors."""
    return reference_models(tiny_state_dict, TINY), engine_models(tiny_state_dict, TINY)


@pytest.fixture(scope="session")
def reference_tokenizer_files(tmp_path_factory) -> tuple[str, str]:
    """vocab.json / merges.txt for transformers' CLIPTokenizer (the hub's openai/clip-vit-large-patch14
    files), derived from the bundled merges file; a fresh ReferenceTokenizer(*files) per test that mutates it."""
    from tools.make_tokenizer_golden import derive_vocab_and_merges
    vocab, merges, _ = derive_vocab_and_merges(tmp_path_factory.mktemp("tokenizer"))
    return str(vocab), str(merges)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread runs them many times faster than two on a small, shared CPU
    (no threads spinning against other processes). Use with pytest.mark.usefixtures; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
