"""Small launches of the Triton kernels for compute-sanitizer (memcheck, racecheck) on a GPU:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m bench.gpu_sanitize

One PatchMatch level (entry scores and a step at dilations 1 and 2; fp32 and bf16; two references of
different sizes, batch 2, a map size that leaves partial tiles) and one deformable convolution forward and
backward (bf16 and fp32, offset groups 1 and 4), each synchronised and checked against the PyTorch path,
so that a fault is reported at the launch that caused it."""

from __future__ import annotations

import sys

import torch


def patchmatch() -> None:
    from amsa.matching.torch_backend import TorchLevels
    from amsa.matching.triton_backend import TritonLevel

    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 64, 37, 29, device="cuda").to(dtype)
        refs = [torch.randn(2, 64, h, w, device="cuda").to(dtype) for h, w in ((33, 41), (17, 19))]
        pos = torch.stack([torch.stack([torch.randint(0, r.shape[2], (2, 37, 29)),
                                        torch.randint(0, r.shape[3], (2, 37, 29))], -1) for r in refs]).cuda()
        kern, ref = TritonLevel(q, refs), TorchLevels(q, refs)
        score = kern.score_positions(pos)
        torch.testing.assert_close(score, ref.score_positions(pos), atol=1e-4, rtol=0)
        for k in (1, 2):
            out = kern.step(pos, score, k, False)
            torch.cuda.synchronize()
            assert torch.isfinite(out[1]).all()


def deform() -> None:
    from amsa.deform import deform_conv2d, deform_conv2d_torch

    for dtype in (torch.bfloat16, torch.float32):
        for G in (1, 4):
            x = torch.randn(2, 32, 13, 11, device="cuda", dtype=dtype, requires_grad=True)
            off = (3 * torch.randn(2, 18 * G, 13, 11, device="cuda")).to(dtype).requires_grad_()
            mask = torch.rand(2, 9 * G, 13, 11, device="cuda", dtype=dtype, requires_grad=True)
            w = (torch.randn(32, 32, 3, 3, device="cuda") / 17).to(dtype).requires_grad_()
            out = deform_conv2d(x, off, w, None, 1, 1, 1, mask)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
            want = deform_conv2d_torch(x.detach(), off.detach(), w.detach(), None, 1, 1, 1, mask.detach())
            torch.testing.assert_close(out.float(), want.float(), atol=0.1, rtol=0.05)
            assert all(torch.isfinite(t.grad).all() for t in (x, off, mask, w))


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    patchmatch()
    deform()
    print("sanitize cases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
