"""amsa.deform_conv2d against the real ``torchvision.ops.deform_conv2d`` on randomised float64 problems:
values and all five gradients, for each CPU backend (``torch``: the PyTorch path; ``numba``: the CPU
kernels, what ``"auto"`` runs on CPU). Run with a Python that has torchvision (never a dependency of amsa),
e.g. a scratch venv: ``PYTHONPATH=. /path/to/venv/bin/python -m bench.torchvision_check --cases 2000``.

Problems: kernels 1x1 to 5x5, strides 1-2, paddings 0-2, dilations 1-2, weight groups 1-2, offset groups
1/2/4/8 (where they divide the channels), masks or none, bias or none; offsets random (several pixels),
exactly integer (the zero-initialised DCNs of training: whole tap rows on -1), or a mix with points far
outside and on the borders -1, 0, H - 1, H; contiguous and channels-last inputs. A case agrees when every
output and gradient is within 1e-9 (relative to its scale) of torchvision's.
"""

from __future__ import annotations

import argparse
import sys

import torch

from amsa.deform import deform_conv2d


def _problem(g: torch.Generator) -> tuple[dict, dict]:
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    kh, kw = ri(1, 5), ri(1, 5)
    groups = ri(1, 2)
    G = [1, 2, 4, 8][ri(0, 3)]
    cin = groups * G * ri(1, 2)
    cout = groups * ri(1, 3)
    H, W = ri(1, 9), ri(1, 9)
    stride, padding, dilation = (ri(1, 2), ri(1, 2)), (ri(0, 2), ri(0, 2)), (ri(1, 2), ri(1, 2))
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        return _problem(g)
    B = ri(1, 2)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    kind = ri(0, 2)
    offset = rnd(B, 2 * G * kh * kw, ho, wo) * 2
    if kind == 1:  # exactly integer: tap rows and columns on -1 at padding >= 1
        offset = offset.round() * (ri(0, 1))
    elif kind == 2:  # borders and far away
        values = torch.tensor([0.0, -1.0, 1.0, float(H - 1), float(H), -float(W), 1e5, -1e5, 0.5])
        offset = values[torch.randint(len(values), offset.shape, generator=g)].double()
    x = rnd(B, cin, H, W)
    if ri(0, 1):
        x = x.contiguous(memory_format=torch.channels_last)
    t = {"input": x, "offset": offset, "weight": rnd(cout, cin // groups, kh, kw),
         "bias": rnd(cout) if ri(0, 1) else None,
         "mask": torch.rand(B, G * kh * kw, ho, wo, generator=g, dtype=torch.float64) if ri(0, 1) else None}
    return t, {"stride": stride, "padding": padding, "dilation": dilation}


def _run(fn, t: dict, conv: dict, gout: torch.Tensor | None) -> dict:
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in t.items()}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], mask=leaves["mask"], **conv)
    res = {"out": out.detach()}
    if gout is not None:
        out.backward(gout)
        res.update({k: None if v is None else v.grad for k, v in leaves.items()})
    return res


def compare(cases: int, seed: int = 0, backend: str = "torch") -> tuple[int, list[str]]:
    """(cases that agree, a line per disagreeing output) for ``amsa.deform_conv2d(backend=backend)``."""
    from torchvision.ops import deform_conv2d as tv

    g = torch.Generator().manual_seed(seed)
    bad = []
    for i in range(cases):
        t, conv = _problem(g)
        gout = torch.randn_like(_run(tv, t, conv, None)["out"])
        want = _run(tv, t, conv, gout)
        got = _run(lambda *a, **k: deform_conv2d(*a, **k, backend=backend), t, conv, gout)
        for name, w in want.items():
            if w is None:
                continue
            err = (got[name] - w).abs().max().item() if w.numel() else 0.0
            if err > 1e-9 * max(1.0, w.abs().max().item() if w.numel() else 1.0):
                bad.append(f"case {i} {name}: max error {err:.3g} ({conv}, offset groups "
                           f"{t['offset'].shape[1] // (2 * t['weight'].shape[2] * t['weight'].shape[3])})")
    return cases - len({b.split()[1] for b in bad}), bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="torch,numba", help="comma-separated amsa CPU backends")
    args = p.parse_args(argv)
    failed = False
    for backend in args.backends.split(","):
        ok, bad = compare(args.cases, args.seed, backend)
        print(f"backend {backend}: {ok} of {args.cases} randomised float64 cases agree with torchvision "
              "(values and 5 gradients)")
        for line in bad[:20]:
            print("  " + line)
        failed |= bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
