"""An independent, deliberately direct FreeKD formulation: the tests' oracle and the speed baseline.

Nothing here imports freekd. The transform is PyWavelets' definition written out (full convolution
with the filters, keep the odd samples), the masks are materialised per token, every token's masked
copies of teacher and student bands are formed, and the L1 is the official mean over batch, tokens,
channels, orientations and pixels of ``|M_t * band_t - M_t * band_s|``.
"""

from __future__ import annotations

import math

import pywt
import torch
import torch.nn.functional as F
from torch import Tensor


def _analysis_1d(x: Tensor, filt: Tensor, dim: int) -> Tensor:
    """PyWavelets' 1-D step along ``dim``: full convolution with ``filt``, samples 1, 3, 5, ..."""
    x = x.movedim(dim, -1)
    shape = x.shape
    length = filt.numel()
    rows = x.reshape(-1, 1, shape[-1])
    # conv1d is a cross-correlation: flip for a convolution; pad L-1 both sides -> full length.
    full = F.conv1d(F.pad(rows, (length - 1, length - 1)), filt.flip(0).view(1, 1, -1))
    out = full[..., 1::2]
    return out.reshape(*shape[:-1], out.shape[-1]).movedim(-1, dim)


def naive_wavedec2(x: Tensor, wavelet: str, levels: int) -> list:
    """``pywt.wavedec2``'s layout: ``[cA_J, (cH_J, cV_J, cD_J), ..., (cH_1, cV_1, cD_1)]``."""
    w = pywt.Wavelet(wavelet)
    lo = torch.tensor(w.dec_lo, dtype=x.dtype, device=x.device)
    hi = torch.tensor(w.dec_hi, dtype=x.dtype, device=x.device)
    details = []
    approx = x
    for _ in range(levels):
        along_w_lo, along_w_hi = _analysis_1d(approx, lo, -1), _analysis_1d(approx, hi, -1)
        approx_next = _analysis_1d(along_w_lo, lo, -2)
        c_h = _analysis_1d(along_w_lo, hi, -2)  # detail along H (rows), approximation along W
        c_v = _analysis_1d(along_w_hi, lo, -2)
        c_d = _analysis_1d(along_w_hi, hi, -2)
        details.append((c_h, c_v, c_d))
        approx = approx_next
    return [approx, *reversed(details)]


def naive_relational_weight(feature: Tensor, next_feature: Tensor | None) -> Tensor:
    """``C * (mean over rows of softmax(psi(F) F^T / sqrt(hw)))``: ``[N, C]``."""
    n, c, h, w = feature.shape
    if next_feature is not None and next_feature.shape[1] == c:
        psi = F.interpolate(next_feature, size=(h, w), mode="bilinear", align_corners=False)
    else:
        psi = feature
    attention = torch.softmax(
        torch.bmm(psi.reshape(n, c, h * w), feature.reshape(n, c, h * w).transpose(1, 2))
        / math.sqrt(h * w),
        dim=-1,
    )
    return c * attention.mean(dim=1)


def naive_channel_weight(teacher, student, teacher_next, student_next) -> Tensor:
    omega = naive_relational_weight(teacher, teacher_next) * naive_relational_weight(
        student, student_next
    )
    return omega / omega.mean(dim=1, keepdim=True)


def naive_token_mask(token: Tensor, band: Tensor) -> Tensor:
    """The official ``sigmoid(mask_token @ x.view(N, C, -1))`` for one token ``[C]`` and a band
    ``[N, C, h, w]`` -> ``[N, h, w]``."""
    n, c, h, w = band.shape
    return torch.sigmoid(token.view(1, 1, c).expand(n, 1, c).bmm(band.reshape(n, c, h * w))).view(
        n, h, w
    )


def naive_layer_loss(
    student: Tensor,
    teacher: Tensor,
    tokens: Tensor,
    granularity: str,
    include_low: bool,
    omega: Tensor | None,
    levels: int = 3,
    wavelet: str = "haar",
) -> Tensor:
    """One layer's FreeKD loss, token by token. ``tokens: [G, T, C]`` in freekd's group order
    (low band, then each level finest first; per level 1 group or one per orientation)."""
    n, c = teacher.shape[:2]
    num_tokens = tokens.shape[1]
    coeffs_t = naive_wavedec2(teacher, wavelet, levels)
    coeffs_s = naive_wavedec2(student, wavelet, levels)
    weight = (
        torch.ones(n, c, 1, 1, dtype=teacher.dtype, device=teacher.device)
        if omega is None
        else omega[..., None, None]
    )
    per_level = 3 if granularity == "band" else 1
    total = teacher.new_zeros(())
    for level in range(1, levels + 1):
        bands_t, bands_s = coeffs_t[-level], coeffs_s[-level]
        group0 = 1 + (level - 1) * per_level
        level_sum = teacher.new_zeros(())
        for t in range(num_tokens):
            for o in range(3):
                if granularity == "level":
                    mask = naive_token_mask(tokens[group0, t], sum(bands_t))
                else:
                    mask = naive_token_mask(tokens[group0 + o, t], bands_t[o])
                masked_t = mask[:, None] * bands_t[o]
                masked_s = mask[:, None] * bands_s[o]
                level_sum = level_sum + (weight * (masked_t - masked_s).abs()).sum()
        h, w = bands_t[0].shape[-2:]
        total = total + level_sum / (n * num_tokens * c * 3 * h * w)
    if include_low:
        low_t, low_s = coeffs_t[0], coeffs_s[0]
        low_sum = teacher.new_zeros(())
        for t in range(num_tokens):
            mask = naive_token_mask(tokens[0, t], low_t)
            low_sum = (
                low_sum + (weight * (mask[:, None] * low_t - mask[:, None] * low_s).abs()).sum()
            )
        h, w = low_t.shape[-2:]
        total = total + low_sum / (n * num_tokens * c * h * w)
    return total


def naive_freekd_loss(
    students: list[Tensor],
    teachers: list[Tensor],
    tokens: list[Tensor],
    granularity: str = "band",
    include_low: bool = False,
    relational: bool = True,
    levels: int = 3,
    wavelet: str = "haar",
) -> Tensor:
    """Sum over layers (fine to coarse) of :func:`naive_layer_loss`."""
    total = teachers[0].new_zeros(())
    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        omega = None
        if relational:
            with torch.no_grad():
                last = i + 1 == len(teachers)
                omega = naive_channel_weight(
                    t,
                    s.detach(),
                    None if last else teachers[i + 1],
                    None if last else students[i + 1].detach(),
                )
        total = total + naive_layer_loss(
            s, t.detach(), tokens[i], granularity, include_low, omega, levels, wavelet
        )
    return total


def naive_dissimilarity(masks: Tensor, kind: str) -> Tensor:
    """``masks: [N, T, P]`` for one group -> mean over images and ordered pairs i != j."""
    n, num_tokens, _ = masks.shape
    values = []
    for b in range(n):
        for i in range(num_tokens):
            for j in range(num_tokens):
                if i == j:
                    continue
                a, c = masks[b, i], masks[b, j]
                if kind == "jaccard":
                    values.append(torch.minimum(a, c).sum() / torch.maximum(a, c).sum())
                else:
                    values.append(2 * (a * c).sum() / ((a * a).sum() + (c * c).sum()))
    return torch.stack(values).mean() if values else masks.new_zeros(())
