"""The key map against the real SD1.5 key table, and remap's error reporting.

`tools/sd15_ldm_keys.tsv` lists all 1,130 tensors of an original SD1.5 checkpoint with their shapes. Every
one must map to exactly one engine parameter of the same shape (after its named transform), and every
engine parameter must be filled. Models are built on the meta device: shapes only, no memory.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd15.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sd15.models.text_encoder import TextEncoder
from sd15.models.unet import UNet
from sd15.models.vae import VAE
from sd15.models.demo import PREFIX
from tools.make_checkpoint import read_key_table
from sd15.files.errors import CheckpointError
from sd15.models.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
from sd15.files.remap import remap

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"unet": 686, "vae": 248, "text_encoder": 196}     # docs/architecture.md, "Numerics"
COMPONENTS = {
    "unet": (UNet, UNetConfig(), unet_key_map, None),
    "vae": (VAE, VAEConfig(), vae_key_map, vae_transforms),
    "text_encoder": (TextEncoder, TextEncoderConfig(), text_key_map, None),
}


def table_for(name: str) -> dict[str, tuple[int, ...]]:
    """The key table's entries for one component, prefix removed."""
    prefix = PREFIX[name]
    return {k[len(prefix):]: s for k, s in read_key_table().items() if k.startswith(prefix)}


def component_case(name: str):
    """(meta source tensors of the table's shapes, key map, engine target shapes, transforms)."""
    module_cls, cfg, key_map_fn, transforms_fn = COMPONENTS[name]
    with torch.device("meta"):
        model = module_cls(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    source = {k: torch.empty(s, device="meta") for k, s in table_for(name).items()}
    return source, key_map_fn(cfg), shapes, (transforms_fn(cfg) if transforms_fn else None)


def test_key_table_is_the_sd15_checkpoint():
    table = read_key_table()
    assert len(table) == 1130
    assert {name: len(table_for(name)) for name in COMPONENTS} == COUNTS
    assert sum(len(table_for(name)) for name in COMPONENTS) == len(table)   # no key outside the 3 prefixes


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_key_map_covers_table_one_to_one_with_shapes(name):
    source, key_map, shapes, transforms = component_case(name)
    assert set(key_map) == set(source)                       # every checkpoint key mapped, no extra ones
    assert len(set(key_map.values())) == len(key_map)        # one-to-one
    assert set(key_map.values()) == set(shapes)              # onto every engine parameter
    assert set(transforms or {}) <= set(key_map)
    out = remap(source, key_map, shapes, component=name, transform_names=transforms)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(s) for k, s in shapes.items()}


def test_vae_attention_is_the_only_transform():
    *_, transforms = component_case("vae")
    assert sorted(transforms) == sorted(f"{side}.mid.attn_1.{n}.weight" for side in ("encoder", "decoder")
                                        for n in ("q", "k", "v", "proj_out"))


# ---- remap reports bad checkpoints by name ------------------------------------------------------------

@pytest.mark.parametrize("name", list(COMPONENTS))
def test_remap_names_missing_key(name):
    source, key_map, shapes, transforms = component_case(name)
    dropped = sorted(source)[len(source) // 2]
    del source[dropped]
    with pytest.raises(CheckpointError, match="missing") as err:
        remap(source, key_map, shapes, component=name, transform_names=transforms)
    assert dropped in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_remap_names_unexpected_key(name):
    source, key_map, shapes, transforms = component_case(name)
    stray = "some.stray_module.weight"
    source[stray] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match="unexpected") as err:
        remap(source, key_map, shapes, component=name, transform_names=transforms)
    assert stray in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("name, key, shape", [
    ("unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024)),   # SD2's context width
    ("unet", "input_blocks.0.0.weight", (320, 9, 3, 3)),                                # inpainting's 9 channels
    ("vae", "encoder.mid.attn_1.q.weight", (512, 512)),                # Linear layout where 1x1 conv is expected
    ("text_encoder", "text_model.embeddings.token_embedding.weight", (49408, 1024)),
    ("text_encoder", "text_model.final_layer_norm.bias", (769,)),
])
def test_remap_names_wrong_shape(name, key, shape):
    source, key_map, shapes, transforms = component_case(name)
    source[key] = torch.empty(shape, device="meta")
    with pytest.raises(CheckpointError, match="wrong shape") as err:
        remap(source, key_map, shapes, component=name, transform_names=transforms)
    assert key in str(err.value) and str(shape) in str(err.value)


# ---- the review tool --------------------------------------------------------------------------------

def _print_keymap(*args: str) -> list[str]:
    run = subprocess.run([sys.executable, "-m", "tools.print_keymap", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return run.stdout.splitlines()


def test_print_keymap_prints_every_key_once():
    lines = _print_keymap()
    assert len(lines) == 1130
    originals = [line.split(" -> ")[0] for line in lines]
    assert sorted(originals) == sorted(read_key_table())
    assert sum(line.endswith(" [conv1x1_to_linear]") for line in lines) == 8


def test_print_keymap_one_component():
    lines = _print_keymap("vae")
    assert len(lines) == COUNTS["vae"]
    assert "first_stage_model.encoder.mid.attn_1.q.weight -> encoder.mid.attn.attn.to_q.weight [conv1x1_to_linear]" \
        in lines
