"""Tiled VAE decode/encode against the untiled VAE, on the tiny random VAE (8x downscale like SD1.5).

Inputs have image-like structure (a smooth field plus texture), so per-tile statistics really differ
from whole-image ones. Errors are mean/max |tiled - untiled| over the output. Measured with these seeds
(torch 2.13, CPU); bounds are set a little above:

  decode 1x4x40x56 latent, tile 16, overlap 4 (3x5 tiles), default refine=1: mean 0.0122, max 0.098
      (output std 0.52). Same tiles with exact statistics (blending alone): mean 5.1e-4, max 0.033.
      Per-tile GroupNorm with the same blending: mean 0.163. Naive non-overlapping tiles: mean 0.235.
  encode 1x3x320x448, tile 128 px, overlap 32 px, default refine=0: mean 0.0159, max 0.121 (latent std
      0.52); per-tile GroupNorm: mean 0.073.
  seams, max over tile borders / mean elsewhere of mean |gradient| per column (row): tiled 1.297 (1.119),
      untiled 1.301 (1.114); naive tiles 2.85 (1.85) where untiled has 0.98 (1.01).
  odd sizes (37x29 latent, tile 17, overlap 5): decode mean 0.0093 max 0.059; encode mean 0.0135 max 0.092.

A random decoder is far more sensitive to its GroupNorm statistics than a trained one, and 16-px tiles
are small next to its receptive field: these are stress sizes, not the expected accuracy.
"""

import pytest
import torch
import torch.nn.functional as F

from sd15.models import vae_tiling as vt
from sd15.models.vae import VAE
from sd15.models.demo import TINY_VAE, random_tensor

MAX_DECODE_MEAN, MAX_DECODE_MAX = 0.016, 0.15
MAX_ENCODE_MEAN, MAX_ENCODE_MAX = 0.02, 0.15


@pytest.fixture(scope="module")
def vae() -> VAE:
    model = VAE(TINY_VAE).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor.copy_(random_tensor(key, tuple(tensor.shape), gen))
    return model


def field(batch: int, channels: int, height: int, width: int, seed: int, texture: float = 0.5) -> torch.Tensor:
    """Smooth large-scale variation + mid-frequency detail + pixel noise: statistics differ from tile to tile."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, max(1, height // 16), max(1, width // 16), generator=gen)
    mid = torch.randn(batch, channels, max(1, height // 4), max(1, width // 4), generator=gen)
    fine = torch.randn(batch, channels, height, width, generator=gen)
    return (F.interpolate(coarse, size=(height, width), mode="bicubic")
            + 0.5 * F.interpolate(mid, size=(height, width), mode="bilinear") + texture * fine)


def latents(batch=1, height=40, width=56, seed=1) -> torch.Tensor:
    return 5.0 * field(batch, 4, height, width, seed)        # unscaled latents are ~1/0.18215 times larger


def images(batch=1, height=320, width=448, seed=2) -> torch.Tensor:
    return torch.tanh(field(batch, 3, height, width, seed, texture=0.05))


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).abs()
    return diff.mean().item(), diff.max().item()


def naive_decode(vae: VAE, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Non-overlapping tiles, each decoded on its own: the baseline tiling must beat by far."""
    rows = [torch.cat([vae.decode(z[..., i:i + tile, j:j + tile]) for j in range(0, z.shape[-1], tile)], -1)
            for i in range(0, z.shape[-2], tile)]
    return torch.cat(rows, -2)


def per_tile_norm_decode(vae: VAE, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Same tiles and blending, but each tile normalised by its own statistics (as diffusers' tiling)."""
    stage = lambda norms, x: vt._up(vae.decoder, x, norms)         # noqa: E731
    return vt._tiled(stage, vt._decoder_start(vae, z), vt._GroupNorms(), tile, overlap, 1, 8)


@pytest.fixture(scope="module")
def decoded(vae) -> dict[str, torch.Tensor]:
    """One 40x56 latent (3x4 tiles of 16 with overlap >= 4) decoded untiled, tiled, and naively tiled."""
    with torch.no_grad():
        z = latents()
        return dict(z=z, ref=vae.decode(z), tiled=vt.decode_tiled(vae, z, tile=16, overlap=4),
                    naive=naive_decode(vae, z, 16))


# ---- the rewritten stages are the modules' own forward ------------------------------------------

@torch.no_grad()
def test_stages_with_live_norms_are_the_vae(vae):
    z, x = latents(), images()
    live = vt._GroupNorms()
    assert torch.equal(vt._up(vae.decoder, vt._decoder_start(vae, z), live), vae.decode(z))
    mean, logvar = vt._encoder_end(vae, vt._down(vae.encoder, x, live))
    ref_mean, ref_logvar = vae.encode_distribution(x)
    assert torch.equal(mean, ref_mean) and torch.equal(logvar, ref_logvar)


@torch.no_grad()
def test_fixed_statistics_reproduce_groupnorm(vae, decoded):
    """Whole-image statistics applied as fixed: the untiled result, in one tile or (near enough) in 12."""
    dec = vae.decoder
    stage = lambda norms, x: vt._up(dec, x, norms)                  # noqa: E731
    h = vt._decoder_start(vae, decoded["z"])
    exact = vt._statistics(stage, h, tile=64, overlap=0, scale=1, refine=0)   # one tile: exact
    assert len(exact) == 3 * 2 * 2 + 1                  # the GroupNorms of the three levels above latent res
    assert errors(vt._tiled(stage, h, vt._GroupNorms(exact), 64, 0, 1, 8), decoded["ref"])[1] < 1e-4
    # Tiles differ from the whole only near their zero-padded borders, which the blend leaves out.
    mean, worst = errors(vt._tiled(stage, h, vt._GroupNorms(exact), 16, 4, 1, 8), decoded["ref"])
    print(f"decode with exact statistics: mean {mean:.2e} max {worst:.2e}")
    assert mean < 1e-3 and worst < 0.06
    # The first GroupNorm sees the (upsampled) input itself, so the sums over the tiles' own parts are exact.
    first = dec.up[1].res[0].norm1
    tiled = vt._statistics(stage, h, tile=16, overlap=4, scale=1, refine=0)[first]
    assert torch.allclose(tiled[0], exact[first][0], atol=1e-6) and torch.allclose(tiled[1], exact[first][1], rtol=1e-5)


# ---- accuracy ---------------------------------------------------------------------------------

@torch.no_grad()
def test_decode_close_to_untiled_and_far_better_than_naive(vae, decoded):
    ref, tiled = decoded["ref"], decoded["tiled"]
    assert tiled.shape == ref.shape
    mean, worst = errors(tiled, ref)
    naive_mean, _ = errors(decoded["naive"], ref)
    per_tile_mean, _ = errors(per_tile_norm_decode(vae, decoded["z"], 16, 4), ref)
    print(f"decode: mean {mean:.4f} max {worst:.3f}; naive {naive_mean:.4f}; per-tile norms {per_tile_mean:.4f}; "
          f"output std {ref.std():.3f}")
    assert mean < MAX_DECODE_MEAN and worst < MAX_DECODE_MAX
    assert naive_mean > 5 * mean and per_tile_mean > 5 * mean


@torch.no_grad()
def test_encode_close_to_untiled(vae):
    x = images()                                    # 320x448 px = 40x56 latent: 3x4 tiles
    ref_mean, ref_logvar = vae.encode_distribution(x)
    mean, logvar = vt.encode_distribution_tiled(vae, x, tile=128, overlap=32)
    assert mean.shape == ref_mean.shape and logvar.shape == ref_logvar.shape
    err, worst = errors(mean, ref_mean)
    logvar_err = errors(logvar, ref_logvar)[0]
    per_tile = vt._tiled(lambda norms, t: vt._down(vae.encoder, t, norms), x, vt._GroupNorms(), 16, 4, 8, 1)
    per_tile_err = errors(vt._encoder_end(vae, per_tile)[0], ref_mean)[0]
    print(f"encode: mean {err:.4f} max {worst:.3f}; per-tile norms {per_tile_err:.4f}; logvar mean {logvar_err:.4f}; "
          f"latent std {ref_mean.std():.3f}")
    assert err < MAX_ENCODE_MEAN and worst < MAX_ENCODE_MAX and logvar_err < MAX_ENCODE_MEAN
    assert per_tile_err > 3 * err
    assert torch.equal(vt.encode_tiled(vae, x, tile=128, overlap=32), mean)


@torch.no_grad()
def test_no_seams(decoded):
    """Across tile borders the image changes no faster than elsewhere, as untiled; naive tiles fail this."""
    def border_ratio(img: torch.Tensor, dim: int, borders: torch.Tensor) -> float:
        step = img.diff(dim=dim).abs().mean(dim=(0, 1, 2 if dim == -1 else 3))   # mean |gradient| per column/row
        return (step[borders].max() / step[~borders].mean()).item()

    for dim, length in ((-1, 56), (-2, 40)):
        overlaps = torch.zeros(length * 8 - 1, dtype=torch.bool)          # between pixel i and i + 1
        spans = vt._spans(length, 16, 4)
        for before, after in zip(spans, spans[1:]):
            overlaps[after.start * 8 - 1:before.end * 8] = True
        edges = torch.zeros_like(overlaps)
        edges[torch.arange(16 * 8 - 1, length * 8 - 1, 16 * 8)] = True    # where naive tiles meet
        ref, tiled = border_ratio(decoded["ref"], dim, overlaps), border_ratio(decoded["tiled"], dim, overlaps)
        ref_edges, naive = border_ratio(decoded["ref"], dim, edges), border_ratio(decoded["naive"], dim, edges)
        print(f"dim {dim}: max over borders / mean elsewhere of |gradient|: tiled {tiled:.3f} (untiled {ref:.3f}); "
              f"naive {naive:.3f} (untiled {ref_edges:.3f})")
        assert tiled < 1.03 * ref
        assert naive > 1.5 * ref_edges                                    # the measure does see a seam


# ---- shapes, edge cases, the switch -------------------------------------------------------------

@torch.no_grad()
def test_tile_covering_the_input_is_the_untiled_vae(vae):
    z, x = latents(height=24, width=16), images(height=128, width=192)
    assert torch.equal(vt.decode_tiled(vae, z, tile=24, overlap=4), vae.decode(z))
    assert torch.equal(vt.encode_tiled(vae, x, tile=192, overlap=32), vae.encode(x))
    mean, logvar = vt.encode_distribution_tiled(vae, x, tile=256)
    ref_mean, ref_logvar = vae.encode_distribution(x)
    assert torch.equal(mean, ref_mean) and torch.equal(logvar, ref_logvar)


@torch.no_grad()
def test_odd_sizes_and_odd_overlap(vae):
    z = latents(height=37, width=29, seed=3)
    ref = vae.decode(z)
    tiled = vt.decode_tiled(vae, z, tile=17, overlap=5)
    assert tiled.shape == (1, 3, 296, 232)
    mean, worst = errors(tiled, ref)
    print(f"odd decode: mean {mean:.4f} max {worst:.3f}")
    assert mean < 0.016 and worst < 0.12
    x = images(height=296, width=232, seed=4)          # 37x29 latent
    enc = vt.encode_tiled(vae, x, tile=136, overlap=36)
    assert enc.shape == (1, 4, 37, 29)
    mean, worst = errors(enc, vae.encode(x))
    print(f"odd encode: mean {mean:.4f} max {worst:.3f}")
    assert mean < 0.025 and worst < 0.2


@torch.no_grad()
def test_batch_is_per_sample(vae):
    """Each sample keeps its own statistics: a batch tiles exactly like its samples one by one."""
    z = latents(batch=2, height=24, width=40, seed=5)
    batch = vt.decode_tiled(vae, z, tile=16, overlap=4)
    one = vt.decode_tiled(vae, z[1:], tile=16, overlap=4)
    assert batch.shape == (2, 3, 192, 320)
    assert errors(batch[1:], one)[1] < 1e-4
    mean, worst = errors(batch, vae.decode(z))
    print(f"batch decode: mean {mean:.4f} max {worst:.3f}")
    assert mean < MAX_DECODE_MEAN and worst < MAX_DECODE_MAX
    x = images(batch=2, height=192, width=320, seed=6)
    batch = vt.encode_tiled(vae, x, tile=128, overlap=32)
    assert errors(batch[:1], vt.encode_tiled(vae, x[:1], tile=128, overlap=32))[1] < 1e-4


def test_bad_arguments_name_the_fix(vae):
    with pytest.raises(ValueError, match="overlap"):
        vt.decode_tiled(vae, latents(), tile=16, overlap=16)
    with pytest.raises(ValueError, match="refine"):
        vt.decode_tiled(vae, latents(), refine=-1)
    with pytest.raises(ValueError, match="divisible by 8"):
        vt.encode_tiled(vae, images(height=100, width=96))


def test_should_tile_thresholds():
    assert not vt.should_tile(512, 512)
    assert not vt.should_tile(768, 768)
    assert vt.should_tile(768, 776)
    assert vt.should_tile(1024, 1024)
    assert vt.should_tile(512, 512, batch_size=4)              # same pixels as one 1024x1024
    assert not vt.should_tile(1024, 1024, budget_bytes=64 << 30)
    assert vt.decode_memory_estimate(1024, 1024) == 4 * vt.decode_memory_estimate(512, 512)
