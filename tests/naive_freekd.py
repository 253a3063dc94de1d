"""An independent, deliberately direct FreeKD formulation: the tests' oracle and the speed baseline.

Nothing here imports freekd. The transform is PyWavelets' definition written out (full convolution
with the filters, keep the odd samples), the masks are materialised per token, every token's masked
copies of teacher and student bands are formed, and the L1 is the official mean over batch, tokens,
channels, orientations and pixels of ``|M_t * band_t - M_t * band_s|``.

The options beyond the paper are written out the same direct way: the mask logit scales, the
cosine relational weight, per-layer levels, per-coefficient weighting, FreeKD+'s decoupled low
band (unmasked L2) and its student-refined masks (each token's mask times the mean of the
student's token masks).
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


def _psi(feature: Tensor, next_feature: Tensor | None) -> Tensor:
    """The next feature upsampled (bilinear) to ``feature``'s grid, or ``feature`` itself."""
    n, c, h, w = feature.shape
    if next_feature is not None and next_feature.shape[1] == c:
        return F.interpolate(next_feature, size=(h, w), mode="bilinear", align_corners=False)
    return feature


def naive_relational_weight(feature: Tensor, next_feature: Tensor | None) -> Tensor:
    """``C * (mean over rows of softmax(psi(F) F^T / sqrt(hw)))``: ``[N, C]``."""
    n, c, h, w = feature.shape
    psi = _psi(feature, next_feature)
    attention = torch.softmax(
        torch.bmm(psi.reshape(n, c, h * w), feature.reshape(n, c, h * w).transpose(1, 2))
        / math.sqrt(h * w),
        dim=-1,
    )
    return c * attention.mean(dim=1)


def naive_cosine_relational_weight(
    feature: Tensor, next_feature: Tensor | None, temperature: float = 0.1
) -> Tensor:
    """``C * (mean over rows of softmax(cos(psi(F)_i, F_j) / tau))``, the cosine similarity of
    flattened channel maps taken pair by pair: ``[N, C]``."""
    n, c, h, w = feature.shape
    psi = _psi(feature, next_feature).reshape(n, c, h * w)
    flat = feature.reshape(n, c, h * w)
    cosine = feature.new_zeros(n, c, c)
    for b in range(n):
        for i in range(c):
            for j in range(c):
                norms = psi[b, i].norm().clamp_min(1e-12) * flat[b, j].norm().clamp_min(1e-12)
                cosine[b, i, j] = (psi[b, i] * flat[b, j]).sum() / norms
    return c * torch.softmax(cosine / temperature, dim=-1).mean(dim=1)


def naive_channel_weight(
    teacher,
    student,
    teacher_next,
    student_next,
    kind: str = "raw",
    temperature: float = 0.1,
    source: str = "product",
) -> Tensor:
    """``omega_t * omega_s`` (or ``omega_t`` alone for ``source="teacher"``), mean 1."""

    def weight(feature, next_feature):
        if kind == "cosine":
            return naive_cosine_relational_weight(feature, next_feature, temperature)
        return naive_relational_weight(feature, next_feature)

    omega = weight(teacher, teacher_next)
    if source == "product":
        omega = omega * weight(student, student_next)
    return omega / omega.mean(dim=1, keepdim=True)


def naive_token_mask(token: Tensor, band: Tensor, mask_logits: str = "raw") -> Tensor:
    """The official ``sigmoid(mask_token @ x.view(N, C, -1))`` for one token ``[C]`` and a band
    ``[N, C, h, w]`` -> ``[N, h, w]``. ``mask_logits="scaled"`` divides the product by
    ``sqrt(C)``; ``"normalized"`` first divides each pixel's channel vector by its norm."""
    n, c, h, w = band.shape
    if mask_logits == "normalized":
        band = band / (band * band).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    logits = token.view(1, 1, c).expand(n, 1, c).bmm(band.reshape(n, c, h * w))
    if mask_logits == "scaled":
        logits = logits / math.sqrt(c)
    return torch.sigmoid(logits).view(n, h, w)


def _student_mean_mask(tokens: Tensor, group: int, band: Tensor, mask_logits: str) -> Tensor:
    """Mean over the ``T`` tokens of group ``group`` of their masks on a student band."""
    masks = [naive_token_mask(tokens[group, t], band, mask_logits) for t in range(tokens.shape[1])]
    return sum(masks) / len(masks)


def naive_layer_loss(
    student: Tensor,
    teacher: Tensor,
    tokens: Tensor,
    granularity: str,
    include_low: bool,
    omega: Tensor | None,
    levels: int = 3,
    wavelet: str = "haar",
    *,
    mask_logits: str = "raw",
    band_weighting: str = "band",
    decoupled: bool = False,
    student_masks: bool = False,
) -> Tensor:
    """One layer's FreeKD loss, token by token. ``tokens: [G, T, C]`` in freekd's group order
    (low band, then each level finest first; per level 1 group or one per orientation).

    ``band_weighting="coefficient"``: the sums of all distilled bands over their total number of
    coefficients; ``decoupled``: the low band as an unmasked L2 mean instead of a masked L1;
    ``student_masks``: each token's mask multiplied by the student's mean mask of that group."""
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
    band_means, band_sums, coefficients = [], [], 0
    for level in range(1, levels + 1):
        bands_t, bands_s = coeffs_t[-level], coeffs_s[-level]
        group0 = 1 + (level - 1) * per_level
        level_sum = teacher.new_zeros(())
        for t in range(num_tokens):
            for o in range(3):
                group = group0 if granularity == "level" else group0 + o
                mask_band_t = sum(bands_t) if granularity == "level" else bands_t[o]
                mask = naive_token_mask(tokens[group, t], mask_band_t, mask_logits)
                if student_masks:
                    mask_band_s = sum(bands_s) if granularity == "level" else bands_s[o]
                    with torch.no_grad():
                        mask = mask * _student_mean_mask(tokens, group, mask_band_s, mask_logits)
                masked_t = mask[:, None] * bands_t[o]
                masked_s = mask[:, None] * bands_s[o]
                level_sum = level_sum + (weight * (masked_t - masked_s).abs()).sum()
        h, w = bands_t[0].shape[-2:]
        band_means.append(level_sum / (n * num_tokens * c * 3 * h * w))
        band_sums.append(level_sum / num_tokens)
        coefficients += n * c * 3 * h * w
    low_t, low_s = coeffs_t[0], coeffs_s[0]
    h, w = low_t.shape[-2:]
    if include_low and not decoupled:
        low_sum = teacher.new_zeros(())
        for t in range(num_tokens):
            mask = naive_token_mask(tokens[0, t], low_t, mask_logits)
            if student_masks:
                with torch.no_grad():
                    mask = mask * _student_mean_mask(tokens, 0, low_s, mask_logits)
            low_sum = (
                low_sum + (weight * (mask[:, None] * low_t - mask[:, None] * low_s).abs()).sum()
            )
        band_means.append(low_sum / (n * num_tokens * c * h * w))
        band_sums.append(low_sum / num_tokens)
        coefficients += n * c * h * w
    coefficient_mean = sum(band_sums) / coefficients
    total = coefficient_mean if band_weighting == "coefficient" else sum(band_means)
    if decoupled:
        total = total + (weight * (low_t - low_s) ** 2).sum() / (n * c * h * w)
    return total


def naive_freekd_loss(
    students: list[Tensor],
    teachers: list[Tensor],
    tokens: list[Tensor],
    granularity: str = "band",
    include_low: bool = False,
    relational: bool = True,
    levels: int | list[int] = 3,
    wavelet: str = "haar",
    *,
    relation_kind: str = "raw",
    relation_temperature: float = 0.1,
    relation_source: str = "product",
    **layer_options,
) -> Tensor:
    """Sum over layers (fine to coarse) of :func:`naive_layer_loss`; ``levels`` one int or one
    per layer; ``layer_options``: the keyword options of :func:`naive_layer_loss`."""
    layer_levels = [levels] * len(teachers) if isinstance(levels, int) else list(levels)
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
                    relation_kind,
                    relation_temperature,
                    relation_source,
                )
        total = total + naive_layer_loss(
            s,
            t.detach(),
            tokens[i],
            granularity,
            include_low,
            omega,
            layer_levels[i],
            wavelet,
            **layer_options,
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
