"""The official release's CFE-PatchMatch as its test script runs it (``feature_match_index`` of
``mmsr/models/archs/patch_match_arch.py``, written anew here from its definition), with each of its
departures from ``amsa.cfe_patchmatch`` switchable, so the effect of every one on the matches can be
measured (``python -m bench.fidelity``).

One sample, a query and a reference :class:`amsa.Pyramid` (coarse to fine; the official pipeline passes
the finest levels per-pixel normalised, the coarse ones raw). The official algorithm, with the switch that
replaces each quirk by our rule:

* ``valid_border``: the finest level uses valid 3x3 patches only (the maps shrink by 2; the result gets a
  zero-score border) and the coarse levels zero-padded ones; off: zero-padded patches everywhere.
* ``finest_dilations``: every level sweeps the dilations 1, 2, .., 2^floor(log2((min side of the finest
  valid map - 1) // 8)) for LR propagation and the same from the reference for Ref propagation; off: the
  per-level rule of :func:`amsa.dilations`.
* ``separate_sweeps``: an iteration is LR propagation at every dilation, then Ref propagation at every
  dilation; off: LR then Ref propagation at each dilation in turn (our propagation step).
* ``reflect``: LR-propagation neighbours outside the query grid are reflected back in (the candidates of
  a 3x3 window in raster order, the own match in the middle: ties go to the earlier one); off: skipped,
  and the own match first.
* ``wrap_jitter``: Ref-propagation candidates wrap around the reference (modulo its size) and are jittered
  by ``(iteration % k) * d``; off: clamped, no jitter.
* ``round_init``: the start ``round(U(0, 1) * (size - 1))`` (the end points half as likely); off: uniform
  integers. Both from a seeded generator here (the official one is unseeded).
* ``scale_up``: a level is passed up by ``round(p * (w_fine - 1) / (w_coarse - 1))`` and 2x repetition; off:
  :func:`amsa.upsample_positions`.

Scores: the official ``S`` of the finest level, ``<query patch, reference patch / ||reference patch||>``,
which is 3 cos for patches of unit pixel vectors. Returns ``(pos [H, W, 2] in pixels, S [H, W])``. With
every quirk fixed and the same start (``init``) the result is that of ``amsa.cfe_patchmatch`` (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from amsa.matching import upsample_positions
from amsa.matching.schedule import dilations

QUIRKS = ("valid_border", "finest_dilations", "separate_sweeps", "reflect", "wrap_jitter", "round_init",
          "scale_up")
_TAPS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
# The official Ref-propagation jitter directions, per tap of the 3x3 window in raster order.
_JITTER = [(1, 0), (0, -1), (0, -1), (1, 0), (0, 0), (-1, 0), (0, 1), (0, 1), (-1, 0)]


def _patches(x: torch.Tensor, valid: bool, normalise: bool) -> torch.Tensor:
    """[C, h, w] -> 3x3 patch vectors [9C, h', w'] (valid: h - 2, w - 2; else zero-padded h, w)."""
    c, h, w = x.shape
    u = F.unfold(x[None], 3, padding=0 if valid else 1)[0]
    if normalise:
        u = F.normalize(u, dim=0)
    return u.view(9 * c, h - 2 if valid else h, w - 2 if valid else w)


def _evaluate(q: torch.Tensor, r: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, valid: torch.Tensor):
    """Scores of candidates (cy, cx) [K, h, w] for every query patch; invalid ones -inf."""
    k, h, w = cy.shape
    flat = (cy * r.shape[2] + cx).view(k, -1)
    cand = r.view(r.shape[0], -1)[:, flat]  # [9C, K, h*w]
    s = (cand * q.view(q.shape[0], 1, -1)).sum(0).view(k, h, w)
    return torch.where(valid, s, -math.inf)


def _pick(s: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor):
    j = s.argmax(0, keepdim=True)  # the first maximum
    return cy.gather(0, j)[0], cx.gather(0, j)[0]


def official_scores(q: torch.Tensor, r: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The official finest-level score ``<query patch, reference patch / ||reference patch||>`` (valid
    patches, a zero border) at positions [H, W, 2] (pixels) of one sample ([1, C, H, W] maps): [H, W]."""
    qp, rp = _patches(q[0].double(), True, False), _patches(r[0].double(), True, True)
    py, px = pos[1:-1, 1:-1, 0] - 1, pos[1:-1, 1:-1, 1] - 1
    ok = (py >= 0) & (py < rp.shape[1]) & (px >= 0) & (px < rp.shape[2])
    s = _evaluate(qp, rp, py.clamp(0, rp.shape[1] - 1)[None], px.clamp(0, rp.shape[2] - 1)[None], ok[None])
    return F.pad(torch.where(ok, s[0], torch.nan), (1, 1, 1, 1))


def official_feature_match(query, ref, iters=(1, 1, 1, 4), *, seed: int = 0, fix: tuple[str, ...] = (),
                           init: torch.Tensor | None = None):
    """Match one sample the official way (every quirk of :data:`QUIRKS` not named in ``fix``); ``init``
    [h0, w0, 2] (y, x) replaces the random start at the coarsest level."""
    unknown = set(fix) - set(QUIRKS)
    if unknown:
        raise ValueError(f"fix: unknown quirks {sorted(unknown)}; choose from {QUIRKS}")
    on = {q: q not in fix for q in QUIRKS}
    if len(query) != len(iters) or len(ref) != len(iters):
        raise ValueError("query and ref need one level per entry of iters")
    qs, rs = [x[0] for x in query], [x[0] for x in ref]  # coarse to fine, one sample
    n = len(iters)
    maps = [(_patches(q, on["valid_border"] and i == n - 1, False),
             _patches(r, on["valid_border"] and i == n - 1, True)) for i, (q, r) in enumerate(zip(qs, rs))]
    qf, rf = maps[-1]
    finest_q = 2 ** math.floor(math.log2((min(qf.shape[1:]) - 1) // 8))
    finest_r = 2 ** math.floor(math.log2((min(rf.shape[1:]) - 1) // 8))
    g = torch.Generator().manual_seed(seed)
    py = px = None
    for i, (q, r) in enumerate(maps):
        h, w = q.shape[1:]
        h1, w1 = r.shape[1:]
        if i == 0:
            if init is not None:
                py, px = init[..., 0].long(), init[..., 1].long()
            elif on["round_init"]:
                px = torch.round(torch.rand(h, w, generator=g, dtype=torch.float64) * (w1 - 1)).long()
                py = torch.round(torch.rand(h, w, generator=g, dtype=torch.float64) * (h1 - 1)).long()
            else:
                px, py = torch.randint(0, w1, (h, w), generator=g), torch.randint(0, h1, (h, w), generator=g)
        elif on["scale_up"]:
            hp, wp = maps[i - 1][1].shape[1:]
            px = torch.round(px * (w1 - 1) / (wp - 1)).long().repeat_interleave(2, 0).repeat_interleave(2, 1)
            py = torch.round(py * (h1 - 1) / (hp - 1)).long().repeat_interleave(2, 0).repeat_interleave(2, 1)
            cut = (px.shape[0] - h) // 2, (px.shape[1] - w) // 2  # the finest valid map is 2 smaller
            px, py = px[cut[0]:cut[0] + h, cut[1]:cut[1] + w], py[cut[0]:cut[0] + h, cut[1]:cut[1] + w]
        else:
            hp, wp = maps[i - 1][1].shape[1:]
            up = upsample_positions(torch.stack([py, px], -1)[None], (hp, wp), (h1, w1), (h, w))[0]
            py, px = up[..., 0], up[..., 1]
        if on["finest_dilations"]:
            lr_ks = [2**t for t in range(int(math.log2(finest_q)) + 1)]
            ref_ks = [2**t for t in range(int(math.log2(finest_r)) + 1)]
        else:
            lr_ks = ref_ks = dilations((h, w))
        for it in range(iters[i]):
            if on["separate_sweeps"]:
                for k in lr_ks:
                    py, px = _lr_propagation(q, r, py, px, k, on["reflect"])
                for k in ref_ks:
                    py, px = _ref_propagation(q, r, py, px, k, it, on["wrap_jitter"])
            else:
                for k in lr_ks:
                    py, px = _lr_propagation(q, r, py, px, k, on["reflect"])
                    py, px = _ref_propagation(q, r, py, px, k, it, on["wrap_jitter"])
    score = _evaluate(qf, rf, py[None], px[None], torch.ones(1, *py.shape, dtype=torch.bool))[0]
    if on["valid_border"]:  # back to pixel coordinates, the border scored 0
        py, px = F.pad(py + 1, (1, 1, 1, 1)), F.pad(px + 1, (1, 1, 1, 1))
        score = F.pad(score, (1, 1, 1, 1))
    return torch.stack([py, px], -1), score


def _lr_propagation(q, r, py, px, k: int, reflect: bool):
    h, w = py.shape
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
    cand_y, cand_x, ok = [], [], []
    taps = _TAPS if reflect else [(0, 0)] + [t for t in _TAPS if t != (0, 0)]
    for dy, dx in taps:
        uy, ux = ys + k * dy, xs + k * dx
        inside = (uy >= 0) & (uy < h) & (ux >= 0) & (ux < w)
        if reflect:  # ReflectionPad2d: -1 -> 1, h -> h - 2
            uy = torch.where(uy < 0, -uy, torch.where(uy >= h, 2 * (h - 1) - uy, uy))
            ux = torch.where(ux < 0, -ux, torch.where(ux >= w, 2 * (w - 1) - ux, ux))
            inside = torch.ones_like(inside)
        uy, ux = uy.clamp(0, h - 1).expand(h, w), ux.clamp(0, w - 1).expand(h, w)
        cand_y.append(py[uy, ux])
        cand_x.append(px[uy, ux])
        ok.append(inside.expand(h, w))
    cy, cx, valid = torch.stack(cand_y), torch.stack(cand_x), torch.stack(ok)
    return _pick(_evaluate(q, r, cy, cx, valid), cy, cx)


def _ref_propagation(q, r, py, px, k: int, iteration: int, wrap_jitter: bool):
    h1, w1 = r.shape[1:]
    taps = _TAPS if wrap_jitter else [(0, 0)] + [t for t in _TAPS if t != (0, 0)]
    cy, cx = [], []
    for t, (dy, dx) in enumerate(taps):
        if wrap_jitter:
            jy, jx = _JITTER[t]
            cy.append((py + k * dy + (iteration % k) * jy + h1) % h1)
            cx.append((px + k * dx + (iteration % k) * jx + w1) % w1)
        else:
            cy.append((py + k * dy).clamp(0, h1 - 1))
            cx.append((px + k * dx).clamp(0, w1 - 1))
    cy, cx = torch.stack(cy), torch.stack(cx)
    return _pick(_evaluate(q, r, cy, cx, torch.ones_like(cy, dtype=torch.bool)), cy, cx)
