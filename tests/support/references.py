"""Independent float64 references of matching (Eq. 1-2), written without the library's code paths, and
the smooth random features the matcher tests climb."""

import torch
import torch.nn.functional as F


def patches64(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, 9C] float64 3x3 patch vectors with zero padding, by explicit slicing."""
    x = x.double()
    B, C, h, w = x.shape
    p = F.pad(x, (1, 1, 1, 1))
    taps = [p[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.stack(taps, dim=2).reshape(B, C * 9, h * w).transpose(1, 2)


def cosine_matrix64(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Full [B, Nq, Nr] float64 matrix of Eq. 1 (0 where a patch is all zero)."""
    q, r = patches64(query), patches64(ref)
    qn, rn = q.norm(dim=-1), r.norm(dim=-1)
    dot = q @ r.transpose(1, 2)
    den = qn[:, :, None] * rn[:, None, :]
    return torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0)


def similarity64(query: torch.Tensor, ref: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Eq. 2 in float64 at positions [B, Hq, Wq, 2]: [B, Hq, Wq]."""
    S = cosine_matrix64(query, ref)
    wr = ref.shape[-1]
    flat = (pos[..., 0] * wr + pos[..., 1]).reshape(pos.shape[0], -1, 1)
    return S.gather(2, flat).reshape(pos.shape[:-1])


def smooth_features(B: int, C: int, h: int, w: int, seed: int, cells: int = 6) -> torch.Tensor:
    """Spatially smooth random features (bicubic-upsampled noise): a landscape PatchMatch can climb."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, C, cells, cells, generator=g)
    x = F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
    return x + 0.05 * torch.randn(B, C, h, w, generator=g)
