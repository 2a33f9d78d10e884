"""The PyTorch path of CFE-PatchMatch (paper Eq. 1-5): the reference of the kernels (Triton and numba).

Maps are kept zero-padded by one pixel and flattened channels-last, [B*(h+2)*(w+2), C], so a patch tap is
a row gather and out-of-grid taps read zeros (the paper's zero padding). Candidate patches are gathered in
chunks and their inner products taken with one ``bmm`` per chunk: memory O(N*C), never O(N*C*81).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amsa.matching.schedule import NEIGHBOURS, TAPS

__all__ = [
    "TorchLevel", "TorchLevels", "acc_dtype", "concatenated_refs", "normalise_rows", "pad_channels_last",
    "patch_norms", "unfold_normalised",
]


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 features (reference checks and gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pad_channels_last(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> zero-padded channels-last [B, h+2, w+2, C], contiguous."""
    return F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()


def patch_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_j|| of every 3x3 patch (zero padding), accumulated in fp32: [B, C, h, w] -> [B, h, w]."""
    sq = x.to(acc_dtype(x)).square().sum(1, keepdim=True)
    return (F.avg_pool2d(sq, 3, stride=1, padding=1, count_include_pad=True) * 9).clamp_min(0).sqrt()[:, 0]


def concatenated_refs(padded: list[torch.Tensor], refs: list[torch.Tensor], unit: int) -> tuple:
    """One level's references as the fused kernels (Triton and numba) take them: (the padded maps
    ``padded``, one contiguous map per reference in the kernel's layout, flattened end to end (one map in
    place); the patch norms of ``refs`` end to end; int64 meta [R, 4] per reference: its first element in
    the maps counted in ``unit``-element steps, its first norm, h, w)."""
    flat = [p.view(-1) for p in padded]
    maps = torch.cat(flat) if len(flat) > 1 else flat[0]
    norms = torch.cat([patch_norms(r).reshape(-1) for r in refs])
    first = [sum(p.numel() for p in flat[:i]) // unit for i in range(len(refs))]
    first_norm = [sum(r.shape[0] * r.shape[2] * r.shape[3] for r in refs[:i]) for i in range(len(refs))]
    meta = [[f, n, r.shape[2], r.shape[3]] for f, n, r in zip(first, first_norm, refs)]
    return maps, norms, torch.tensor(meta, dtype=torch.int64, device=maps.device)


def normalise_rows(u: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows (zero rows stay zero)."""
    n = u.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, u / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(u))


def unfold_normalised(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> normalised 3x3 patch vectors [B, h*w, 9C] in fp32 (zero vector for zero patches):
    the rows of Eq. 1 as a matrix (enumerated matching and its baselines)."""
    return normalise_rows(F.unfold(x.float(), 3, padding=1).transpose(1, 2))


class TorchLevel:
    """One level of one reference prepared for the PyTorch path: padded rows, patch norms, flat index helpers.

    The reference implementation of Eq. 1-5 that the kernels are tested against."""

    def __init__(self, query: torch.Tensor, ref: torch.Tensor):
        B, C, hq, wq = query.shape
        self.qsize, self.rsize = (hq, wq), tuple(ref.shape[-2:])
        wr = self.rsize[1]
        acc = acc_dtype(query)
        self.qrows = pad_channels_last(query.to(acc)).view(-1, C)
        self.rrows = pad_channels_last(ref.to(acc)).view(-1, C)
        self.qnorm = F.pad(patch_norms(query), (1, 1, 1, 1)).reshape(-1)
        self.rnorm = F.pad(patch_norms(ref), (1, 1, 1, 1)).reshape(-1)
        self.qtaps = torch.tensor([dy * (wq + 2) + dx for dy, dx in TAPS], device=query.device)
        self.rtaps = torch.tensor([dy * (wr + 2) + dx for dy, dx in TAPS], device=query.device)
        b = torch.arange(B, device=query.device)[:, None, None]
        y = torch.arange(hq, device=query.device)[None, :, None]
        x = torch.arange(wq, device=query.device)[None, None, :]
        self.qcentre = ((b * (hq + 2) + y + 1) * (wq + 2) + x + 1).reshape(-1)  # [B*hq*wq]
        self.batch = torch.arange(B, device=query.device).repeat_interleave(hq * wq)  # [B*hq*wq]
        # Query pixels per gather: ~8 MB of candidate rows (fp32). Measured on 2 cores at 256x256, C=64:
        # 2 MB chunks are 20 % slower (per-op overhead), 64 MB ones twice as slow (cache).
        self.chunk = max(64, (1 << 21) // (len(NEIGHBOURS) * 9 * C))
        # Reused gather buffers: fresh multi-MB allocations cost page faults on every chunk (about half the
        # time on CPU). Not when a gradient is wanted (patch_similarity), since out= ops do not record one.
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
        self.work = None if needs_grad else (
            torch.empty(self.chunk * 9, C, dtype=acc, device=query.device),
            torch.empty(self.chunk * len(NEIGHBOURS) * 9, C, dtype=acc, device=query.device),
        )

    def ref_rows(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Flat padded-row index of reference pixels (y, x) given as [B*hq*wq, m] tensors."""
        hr, wr = self.rsize
        return (self.batch[:, None] * (hr + 2) + y + 1) * (wr + 2) + x + 1

    def scores(self, rcentre: torch.Tensor) -> torch.Tensor:
        """Eq. 1 for every query pixel against candidate rows [B*hq*wq, m] -> [B*hq*wq, m], in [-1, 1].

        Only the gathers and the inner products run in chunks (memory O(chunk * m * 9C)); the rest is
        vectorised over the level."""
        N, m = rcentre.shape
        dots = []
        for i in range(0, N, self.chunk):
            qc, rc = self.qcentre[i : i + self.chunk], rcentre[i : i + self.chunk]
            n = qc.numel()
            qi = (qc[:, None] + self.qtaps).view(-1)
            ri = (rc[..., None] + self.rtaps).view(-1)
            if self.work is None:
                q, r = self.qrows.index_select(0, qi), self.rrows.index_select(0, ri)
            else:
                q = torch.index_select(self.qrows, 0, qi, out=self.work[0][: qi.numel()])
                r = torch.index_select(self.rrows, 0, ri, out=self.work[1][: ri.numel()])
            dots.append(torch.bmm(r.view(n, m, -1), q.view(n, -1, 1)).view(n, m))
        dot = torch.cat(dots)
        den = self.qnorm[self.qcentre][:, None] * self.rnorm[rcentre]
        safe = torch.where(den > 0, den, torch.ones_like(den))  # exact division, also for tiny norms
        return torch.where(den > 0, dot / safe, torch.zeros_like(dot)).clamp(-1.0, 1.0)

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Eq. 2: scores of positions [B, hq, wq, 2] -> [B, hq, wq]."""
        rows = self.ref_rows(pos[..., 0].reshape(-1, 1), pos[..., 1].reshape(-1, 1))
        return self.scores(rows).view(pos.shape[:-1])

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        """One propagation step at dilation k (LR then Ref propagation); returns new (pos, score)."""
        hq, wq = self.qsize
        hr, wr = self.rsize
        m = len(NEIGHBOURS)
        d = torch.tensor(NEIGHBOURS, device=pos.device) * k  # [8, 2]
        # LR propagation candidates: the neighbours' matches (offset-corrected: minus the displacement).
        big = max(hq, wq) * k + 1
        padded = F.pad(pos.permute(0, 3, 1, 2), (k, k, k, k), value=-big)  # sentinel: outside the grid
        cand = torch.stack([padded[:, :, k + k * dy : k + k * dy + hq, k + k * dx : k + k * dx + wq]
                            for dy, dx in NEIGHBOURS], dim=-1)  # [B, 2, hq, wq, 8]
        valid = (cand[:, 0] > -big).reshape(-1, m)
        cy, cx = cand[:, 0].reshape(-1, m), cand[:, 1].reshape(-1, m)
        if offset_corrected:
            cy, cx = cy - d[:, 0], cx - d[:, 1]
        cy, cx = cy.clamp(0, hr - 1), cx.clamp(0, wr - 1)
        s = torch.where(valid, self.scores(self.ref_rows(cy, cx)), float("-inf"))
        # First maximum over [own, neighbours]: ties keep the own match, then the earlier neighbour.
        best, j = torch.cat([score.reshape(-1, 1), s], 1).max(1, keepdim=True)
        by = torch.cat([pos[..., 0].reshape(-1, 1), cy], 1).gather(1, j)
        bx = torch.cat([pos[..., 1].reshape(-1, 1), cx], 1).gather(1, j)
        # Ref propagation around the freshly updated own match.
        ry, rx = (by + d[:, 0]).clamp(0, hr - 1), (bx + d[:, 1]).clamp(0, wr - 1)
        s2 = self.scores(self.ref_rows(ry, rx))
        out_score, j2 = torch.cat([best, s2], 1).max(1, keepdim=True)
        out_y = torch.cat([by, ry], 1).gather(1, j2)
        out_x = torch.cat([bx, rx], 1).gather(1, j2)
        return torch.cat([out_y, out_x], 1).view_as(pos), out_score.view_as(score)


class TorchLevels:
    """All references of one level on the PyTorch path, with the interface of the Triton backend's
    ``TritonLevel``: positions [R, B, hq, wq, 2] and scores [R, B, hq, wq] stacked over references."""

    def __init__(self, query: torch.Tensor, refs: list[torch.Tensor]):
        self.levels = [TorchLevel(query, r) for r in refs]

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.stack([lv.score_positions(p) for lv, p in zip(self.levels, pos)])

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        out = [lv.step(p, s, k, offset_corrected) for lv, p, s in zip(self.levels, pos, score)]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
