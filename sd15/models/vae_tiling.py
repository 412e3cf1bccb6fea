"""Tiled VAE decode and encode: large images in bounded memory, without seams.

    images = decode_tiled(vae, latents)                 # tiles of 64 latent px (512 px), overlap 16 (128 px)
    mean = encode_tiled(vae, images)                    # tiles of 512 px, overlap 128 px
    if should_tile(height, width, batch_size): ...      # the pipeline's switch (untiled above ~2 GB)

Convolutions are local: a tile computed with a little context is exact inside. Two operations are global:

- the mid block's self-attention, which looks at every latent pixel;
- every GroupNorm, whose mean/variance run over the whole image. Normalising each tile by its own
  statistics (naive tiling, diffusers' `enable_tiling`) gives each tile its own brightness and contrast:
  blocks that blending only smears.

What this module does:

1. Everything at latent resolution runs whole, exactly as untiled: the decoder up to its first upsample
   (`conv_in`, `mid`, the first level's res blocks), the encoder from its last level on (last level,
   `mid`, head). That is the attention and the widest layers, on tensors of 512 x h x w (32 MB for a
   1024^2 image). Tiles cover only the levels above latent resolution, where the memory goes.
2. Inside the tiles every GroupNorm uses whole-image statistics fixed in advance, so every tile applies
   the same function and neighbours agree: no seams by construction, whatever the statistics' error.
   The statistics are mean and variance per (sample, group) over each tile's own part, merged over the
   tiles (whose own parts partition the image), gathered by
   (a) one pass with each tile normalised by its own statistics: exact for the first GroupNorm, close
       for the later ones (their inputs went through per-tile normalisation upstream), then
   (b) `refine` passes normalising with the previous pass's statistics. Pass k makes the first k GroupNorms
       exact; in practice each pass cut the remaining error 2-4x for the decoder, less for the encoder.
   Then a final pass with the fixed statistics produces the output.
3. Tiles overlap by at least `overlap` and are blended with linear ramps half the overlap wide, centred
   in it; the outer quarter of each overlap is context only. That hides the one other difference from
   the untiled image, the zero padding at a tile's own border (with exact statistics the tiled decode is
   within 5e-4 mean, 3e-2 max of untiled on the tiny test VAE).

Measured (random weights, `tests/test_vae_tiling.py` and `tools/measure_vae_tiling.py`), mean |tiled -
untiled| as a fraction of the output's std: tiny VAE, 40x56 latent in 16-px tiles: decode 2.3% (per-tile
GroupNorm with the same blending 31%, naive tiles 45%), encode 3.1% (per-tile 14%). Full SD1.5 VAE,
768x768 decode with the defaults: mean 0.0084 (1.5%, about one 8-bit level), max 0.070. Random decoders
are much more sensitive to their statistics than trained ones, so these are pessimistic.
Memory (fp32, CPU, above the weights): 1024x1024 untiled 3.8 GB, tiled 1.0 GB; 2048x2048 tiled
1.2 GB (untiled would need ~15 GB).

Trade-offs considered:
- Per-tile GroupNorm: one pass, but colour/contrast shifts per tile (above).
- Statistics from a downscaled copy (one cheap pass): biased wherever the image has fine texture;
  measured 4-10x worse than (a) on noise-like content, better only on very smooth content.
- Exact statistics: GroupNorm k needs the whole image through GroupNorms 1..k-1. Either hold every
  full-resolution activation (layer-by-layer tiling: ~2x less memory than untiled, not bounded), or
  one pass per GroupNorm (~10x the compute). Bounded memory at linear cost means estimated statistics.
- Cost: each pass is one tiled run of the stage, ~1.1-1.6x an untiled run for the overlaps. The default
  decode (refine=1: 3 passes) took 3.3x an untiled one at 1024x1024 (293 s vs 88 s, 2 CPU cores);
  encode defaults to refine=0 (2 passes), where refining gained little. refine=0 is the faster choice
  for decode (2-4x the error of refine=1 in our runs). Tile only when memory demands it.

Units: `tile`/`overlap` are latent px for decode and image px for encode (divided by the downscale, 8);
tiles shrink to the smallest equal size that covers the input with the overlap. A tile covering the whole
input means no tiling: the untiled VAE runs, bit for bit. Images to encode must have sides divisible by 8.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .vae import VAE, Decoder, Encoder

DECODE_TILE, DECODE_OVERLAP = 64, 16          # latent px: 512 px tiles with a 128 px overlap
ENCODE_TILE, ENCODE_OVERLAP = 512, 128        # image px
# Untiled decode memory above the weights, measured (tools/measure_vae_tiling.py, fp32, CPU, 1024x1024:
# 3.79 GB): bytes per output pixel at SD1.5 width; it scales with batch * height * width * model width.
DECODE_BYTES_PER_PIXEL = 3600
DEFAULT_BUDGET_BYTES = DECODE_BYTES_PER_PIXEL * 768 * 768   # tile above 768x768 (~2.1 GB untiled)


def decode_memory_estimate(height: int, width: int, batch_size: int = 1, cfg: VAEConfig = VAEConfig(),
                           element_size: int = 4) -> int:
    """Rough peak activation bytes of an untiled decode of `batch_size` images of height x width pixels."""
    return int(DECODE_BYTES_PER_PIXEL * batch_size * height * width * (cfg.channels / 128) * element_size / 4)


def should_tile(height: int, width: int, batch_size: int = 1, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                cfg: VAEConfig = VAEConfig(), element_size: int = 4) -> bool:
    """Whether to use the tiled VAE: an untiled decode would need more than `budget_bytes` of activations.

    The default budget is what one fp32 768x768 decode needs (~2.1 GB), so by default a single image tiles
    above 768x768 and a batch of 4 above 384x384. Pass the memory you can spare as `budget_bytes` to
    decide by memory instead (tiling costs ~3-5x the time on CPU, so don't tile when memory allows).
    """
    return decode_memory_estimate(height, width, batch_size, cfg, element_size) > budget_bytes


@torch.no_grad()
def decode_tiled(vae: VAE, latents: torch.Tensor, *, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP,
                 refine: int = 1) -> torch.Tensor:
    """`vae.decode` in tiles of `tile` latent px overlapping by `overlap`: images [B,3,8h,8w] from unscaled latents."""
    _check_tiling(tile, overlap, refine)
    if max(latents.shape[-2:]) <= tile:
        return vae.decode(latents)
    dec, h = vae.decoder, _decoder_start(vae, latents)
    stats = _statistics(lambda norms, x: _up(dec, x, norms), h, tile, overlap, 1, refine)
    return _tiled(lambda norms, x: _up(dec, x, norms), h, _GroupNorms(stats), tile, overlap, 1, vae.cfg.downscale)


@torch.no_grad()
def encode_distribution_tiled(vae: VAE, images: torch.Tensor, *, tile: int = ENCODE_TILE,
                              overlap: int = ENCODE_OVERLAP, refine: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode_distribution` in tiles of `tile` image px overlapping by `overlap`: (mean, logvar)."""
    _check_tiling(tile, overlap, refine)
    scale = vae.cfg.downscale
    if images.shape[-2] % scale or images.shape[-1] % scale:
        raise ValueError(f"tiled encode needs height and width divisible by {scale}, got "
                         f"{tuple(images.shape[-2:])}: crop or resize the image first")
    if max(images.shape[-2:]) <= tile:
        return vae.encode_distribution(images)
    enc = vae.encoder
    tile, overlap = tile // scale, -(-overlap // scale)       # the grid lives in latent px
    _check_tiling(tile, overlap, refine)
    stats = _statistics(lambda norms, x: _down(enc, x, norms), images, tile, overlap, scale, refine)
    h = _tiled(lambda norms, x: _down(enc, x, norms), images, _GroupNorms(stats), tile, overlap, scale, 1)
    return _encoder_end(vae, h)


def encode_tiled(vae: VAE, images: torch.Tensor, *, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP,
                 refine: int = 0) -> torch.Tensor:
    """`vae.encode` (posterior mean, unscaled) in tiles of `tile` image px overlapping by `overlap`."""
    return encode_distribution_tiled(vae, images, tile=tile, overlap=overlap, refine=refine)[0]


# ---- the tiled stages, written out so that every GroupNorm goes through `norms` ------------------

def _res(res: nn.Module, x: torch.Tensor, norms: "_GroupNorms") -> torch.Tensor:
    """`blocks.ResBlock.forward` without a time embedding (the VAE has none)."""
    h = res.conv1(F.silu(norms(res.norm1, x)))
    h = res.conv2(F.silu(norms(res.norm2, h)))
    return res.skip(x) + h


def _decoder_start(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """The decoder up to where the resolution first rises, untiled: everything at latent resolution."""
    dec = vae.decoder
    h = dec.mid(dec.conv_in(vae.post_quant_conv(latents)))
    for res in dec.up[0].res:
        h = res(h)
    return h


def _up(dec: Decoder, h: torch.Tensor, norms: "_GroupNorms") -> torch.Tensor:
    """The tiled part of the decoder: from the first upsample to the output head."""
    h = dec.up[0].resample(h)
    for level in dec.up[1:]:
        for res in level.res:
            h = _res(res, h, norms)
        if level.resample is not None:
            h = level.resample(h)
    return dec.conv_out(F.silu(norms(dec.norm_out, h)))


def _down(enc: Encoder, x: torch.Tensor, norms: "_GroupNorms") -> torch.Tensor:
    """The tiled part of the encoder: from the input conv to the last downsample."""
    h = enc.conv_in(x)
    for level in enc.down[:-1]:
        for res in level.res:
            h = _res(res, h, norms)
        h = level.resample(h)
    return h


def _encoder_end(vae: VAE, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder from its last level on, untiled (latent resolution), and the posterior (mean, logvar)."""
    enc = vae.encoder
    for res in enc.down[-1].res:
        h = res(h)
    h = enc.conv_out(F.silu(enc.norm_out(enc.mid(h))))
    mean, logvar = vae.quant_conv(h).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)          # as `VAE.encode_distribution`


class _GroupNorms:
    """Stands in for every GroupNorm of a stage: live (statistics of the tensor it sees, as `nn.GroupNorm`)
    when `fixed` is None, else with per-(sample, group) mean/variance fixed in advance. When `region` is set
    it also gathers the statistics of its input over that part of the tile, so that all tiles together give
    the whole image's. `region` = (top, bottom, left, right, height, width) of the tile's own part and of
    the tile, in latent px; a tensor of size n x m inside the stage covers it at n/height x m/width.
    """

    def __init__(self, fixed: dict | None = None):
        self.fixed = fixed
        self.region: tuple[int, ...] | None = None
        self.seen: dict[nn.GroupNorm, tuple[torch.Tensor, ...]] = {}    # count, mean, sum of squared deviations

    def __call__(self, gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.region is not None:
            self._accumulate(gn, x)
        if self.fixed is None:
            return gn(x)
        mean, var = self.fixed[gn]              # [B, G] each; GroupNorm as a per-channel affine map
        per_group = x.shape[1] // gn.num_groups
        scale = gn.weight.float() * (var + gn.eps).rsqrt().repeat_interleave(per_group, dim=1)
        shift = gn.bias.float() - mean.repeat_interleave(per_group, dim=1) * scale
        return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])

    def _accumulate(self, gn: nn.GroupNorm, x: torch.Tensor) -> None:
        top, bottom, left, right, height, width = self.region
        sy, sx = x.shape[-2] // height, x.shape[-1] // width
        part = x[..., top * sy:bottom * sy, left * sx:right * sx].float().unflatten(1, (gn.num_groups, -1))
        var, mean = torch.var_mean(part, dim=(2, 3, 4), correction=0)
        n, m2 = part[0, 0].numel(), var * part[0, 0].numel()
        if gn in self.seen:       # merge with what earlier tiles saw (Chan et al. 1979): stable in float32
            n0, mean0, m20 = self.seen[gn]
            delta = mean - mean0
            n, mean, m2 = n0 + n, mean0 + delta * (n / (n0 + n)), m20 + m2 + delta.square() * (n0 * n / (n0 + n))
        self.seen[gn] = n, mean, m2

    def statistics(self) -> dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]]:
        """Mean and (biased, as GroupNorm's) variance per sample and group of everything seen."""
        return {gn: (mean, m2 / n) for gn, (n, mean, m2) in self.seen.items()}


def _statistics(stage, x, tile, overlap, scale, refine):
    """Whole-image GroupNorm statistics of `stage` over `x`: one pass with each tile normalised by its own
    statistics, then `refine` passes with the statistics of the pass before (see the module docstring)."""
    stats = None
    for _ in range(1 + refine):
        norms = _GroupNorms(stats)
        for rows, cols in _grid((x.shape[-2] // scale, x.shape[-1] // scale), tile, overlap):
            norms.region = (*_own(rows), *_own(cols), rows.end - rows.start, cols.end - cols.start)
            stage(norms, _crop(x, rows, cols, scale))
        stats = norms.statistics()
    return stats


def _tiled(stage, x, norms, tile, overlap, scale_in, scale_out):
    """Run `stage` over `x` in overlapping tiles and blend the outputs with linear ramps."""
    full = (x.shape[-2] // scale_in, x.shape[-1] // scale_in)
    out = weight = None
    for rows, cols in _grid(full, tile, overlap):
        y = stage(norms, _crop(x, rows, cols, scale_in))
        if out is None:
            out = y.new_zeros(*y.shape[:2], full[0] * scale_out, full[1] * scale_out)
            weight = y.new_zeros(full[0] * scale_out, full[1] * scale_out)
        w = _ramp(rows, overlap, scale_out).to(y)[:, None] * _ramp(cols, overlap, scale_out).to(y)
        _crop(out, rows, cols, scale_out).add_(y * w)           # views: accumulate in place
        _crop(weight, rows, cols, scale_out).add_(w)
    return out / weight


# ---- tile geometry, in latent px ------------------------------------------------------------------

class _Span(NamedTuple):
    """One tile along one axis: [start, end), and the middles of its overlaps with the previous and next
    tile (None at the image border). Cuts are where blending crosses over and where a tile's own part ends."""
    start: int
    end: int
    cut_before: float | None
    cut_after: float | None


def _check_tiling(tile: int, overlap: int, refine: int) -> None:
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got tile={tile}, overlap={overlap}")
    if refine < 0:
        raise ValueError(f"refine counts measuring passes and cannot be negative, got {refine}")


def _spans(length: int, tile: int, overlap: int) -> list[_Span]:
    """The fewest tiles of at most `tile` covering [0, length) with neighbours overlapping by at least
    `overlap`, shrunk to the smallest equal size that still does and spread evenly."""
    if length <= tile:
        return [_Span(0, length, None, None)]
    n = math.ceil((length - overlap) / (tile - overlap))
    tile = math.ceil((length + (n - 1) * overlap) / n)
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    cuts = [None] + [(starts[i + 1] + starts[i] + tile) / 2 for i in range(n - 1)] + [None]
    return [_Span(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def _grid(full: tuple[int, int], tile: int, overlap: int):
    for rows in _spans(full[0], tile, overlap):
        for cols in _spans(full[1], tile, overlap):
            yield rows, cols


def _crop(x: torch.Tensor, rows: _Span, cols: _Span, scale: int) -> torch.Tensor:
    return x[..., rows.start * scale:rows.end * scale, cols.start * scale:cols.end * scale]


def _own(span: _Span) -> tuple[int, int]:
    """The tile's own part, relative to the tile: the own parts of all tiles partition the image."""
    first = span.start if span.cut_before is None else math.floor(span.cut_before)
    last = span.end if span.cut_after is None else math.floor(span.cut_after)
    return first - span.start, last - span.start


def _ramp(span: _Span, overlap: int, scale: int) -> torch.Tensor:
    """Blend weights along one axis at output resolution: 1 inside; at each cut a linear ramp half the overlap
    wide, so the outer quarter of every overlap (nearest the tile's zero-padded border) is context only.
    A neighbour's ramp is the complement: weights sum to one."""
    at = torch.arange(span.start * scale, span.end * scale) + 0.5    # pixel centres
    width = overlap * scale / 2
    w = torch.ones_like(at)
    for cut, sign in ((span.cut_before, 1), (span.cut_after, -1)):
        if cut is not None:
            d = sign * (at - cut * scale)
            w *= (d / width + 0.5).clamp(0, 1) if width > 0 else (d > 0).float()
    return w
