"""The weight change ΔW each kind of adapter makes to one module, computed in float32.

    delta = module_delta(factors, weight_shape)      # ΔW·scale, the shape of the module's weight

Kinds, with their scale (A1111's `calc_scale`, kohya, ComfyUI and LyCORIS agree):
  LoRA / LoCon   up U (out, r[, 1, 1]), down D (r, in[, kh, kw]):  ΔW = U·D (reshaped; a 2-D pair on a 1x1
                 conv is reshaped as A1111 does), scale α/r with r = D's rank, 1 without α
  LoCon + Tucker mid M (r, r, kh, kw):  ΔW[i,j,k,l] = Σ U[i,n]·M[n,m,k,l]·D[m,j]
  LoHa           ΔW = (w1a·w1b) ⊙ (w2a·w2b), or with Tucker t1, t2 the two products contracted through them;
                 scale α/r with r = w1b's rank
  LoKr           ΔW = kron(w1, w2), each factor full or a product (w2 possibly through Tucker t2);
                 scale α/r only when a factor is a product (r = w2b's rank if w2 is, else w1b's): with
                 both factors full the scale is 1 whatever α says
DoRA (`dora_scale`) is applied on top by `apply_dora`, as A1111 does (the per-input-channel convention).
"""

import math

import torch
from torch import Tensor

Factors = dict[str, Tensor]      # the file's tensors of one module, by part ("lora_up.weight", "alpha", ...)


def _f(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def kind_of(factors: Factors) -> str:
    if "lora_up.weight" in factors:
        return "LoCon+Tucker" if "lora_mid.weight" in factors else (
            "LoCon" if factors["lora_down.weight"].dim() == 4 and factors["lora_down.weight"].shape[-1] > 1 else "LoRA")
    if "hada_w1_a" in factors:
        return "LoHa"
    if any(k.startswith("lokr_") for k in factors):
        return "LoKr"
    return "unknown"


def rank_of(factors: Factors) -> int | None:
    """The rank α is divided by (None where the scale ignores α)."""
    kind = kind_of(factors)
    if kind.startswith("Lo") and "lora_down.weight" in factors:
        return factors["lora_down.weight"].shape[0]
    if kind == "LoHa":
        return factors["hada_w1_b"].shape[0]
    if kind == "LoKr":
        if "lokr_w2_b" in factors:
            return factors["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in factors:
            return factors["lokr_w1_b"].shape[0]
    return None


def scale_of(factors: Factors) -> float:
    if "scale" in factors:                      # a file may state the scale itself (A1111's `scale` key)
        return float(factors["scale"])
    alpha, rank = factors.get("alpha"), rank_of(factors)
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def _tucker(core: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """Σ_{n,m} up[i,n]·core[n,m,k,l]·down[m,j] -> [i, j, k, l]."""
    return torch.einsum("nmkl,in,mj->ijkl", core, up, down)


def _lora(f: Factors, shape: torch.Size) -> Tensor:
    up, down = _f(f["lora_up.weight"]), _f(f["lora_down.weight"])
    out, rank = up.shape[0], down.shape[0]
    if "lora_mid.weight" in f:
        return _tucker(_f(f["lora_mid.weight"]), up.reshape(out, rank), down.reshape(rank, -1))
    return up.reshape(out, rank) @ down.reshape(rank, -1)


def _loha(f: Factors, shape: torch.Size) -> Tensor:
    w1a, w1b, w2a, w2b = (_f(f[k]) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in f:      # Tucker: w1a [r, out], w1b [r, in], t [r, r, kh, kw]
        m1 = torch.einsum("ijkl,jr,ip->prkl", _f(f["hada_t1"]), w1b, w1a)
        m2 = torch.einsum("ijkl,jr,ip->prkl", _f(f["hada_t2"]), w2b, w2a)
        return m1 * m2
    return (w1a @ w1b) * (w2a @ w2b)


def _lokr(f: Factors, shape: torch.Size) -> Tensor:
    w1 = _f(f["lokr_w1"]) if "lokr_w1" in f else _f(f["lokr_w1_a"]) @ _f(f["lokr_w1_b"])
    if "lokr_w2" in f:
        w2 = _f(f["lokr_w2"])
    elif "lokr_t2" in f:
        w2 = torch.einsum("ijkl,jr,ip->prkl", _f(f["lokr_t2"]), _f(f["lokr_w2_b"]), _f(f["lokr_w2_a"])).contiguous()
    else:
        w2 = _f(f["lokr_w2_a"]) @ _f(f["lokr_w2_b"])
    if len(shape) == 4:      # a 2-D w2 holds (out_2, in_2·kh·kw): the kernel goes on w2, w1 is per channel
        w1 = w1.reshape(*w1.shape[:2], 1, 1) if w1.dim() == 2 else w1
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.dim() == 2 else w2
    return torch.kron(w1, w2)


_DELTAS = {"LoRA": _lora, "LoCon": _lora, "LoCon+Tucker": _lora, "LoHa": _loha, "LoKr": _lokr}


def module_delta(factors: Factors, shape: torch.Size) -> Tensor:
    """ΔW·scale for a module whose weight has `shape`, float32. Raises ValueError if the factors do not
    make that shape."""
    kind = kind_of(factors)
    if kind not in _DELTAS:
        raise ValueError(f"an adapter kind sd15 does not know (parts: {', '.join(sorted(factors))})")
    try:
        delta = _DELTAS[kind](factors, shape)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{kind} factors do not make a weight of shape {tuple(shape)} ({e})") from None
    if delta.shape[0] != shape[0] or delta.numel() != math.prod(shape):
        raise ValueError(f"{kind} factors make {tuple(delta.shape)}, the module's weight is {tuple(shape)}")
    return delta.reshape(shape) * scale_of(factors)


def dora_axis(dora_scale: Tensor, shape: torch.Size) -> str:
    """'input' (A1111's convention: one magnitude per input channel) or 'output' (LyCORIS' wd_on_out, PEFT)."""
    if dora_scale.shape[0] == 1 and dora_scale.numel() == shape[1]:
        return "input"
    if dora_scale.shape[0] == shape[0] and dora_scale.numel() == shape[0]:
        return "output"
    raise ValueError(f"dora_scale of shape {tuple(dora_scale.shape)} fits neither axis of a {tuple(shape)} weight")


def apply_dora(weight: Tensor, delta: Tensor, dora_scale: Tensor, multiplier: float) -> Tensor:
    """A1111's DoRA (`apply_weight_decompose`), in float32: Wc = W + ΔW; per input column n = ||Wc||;
    W' = W + m·(Wc·dora/n − W)."""
    if dora_axis(dora_scale, weight.shape) != "input":
        raise ValueError("this DoRA file keeps one magnitude per output channel (LyCORIS' wd_on_out / PEFT's "
                         "convention); sd15 implements A1111's per-input-channel DoRA only")
    merged = weight + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    dora = _f(dora_scale).reshape(shape)
    return weight + multiplier * (merged * (dora / norm.reshape(shape)) - weight)
