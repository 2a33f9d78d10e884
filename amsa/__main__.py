"""Command line: ``python -m amsa <command>`` (installed as ``amsa``).

Commands:
    demo    CFE-PatchMatch vs enumerated matching on a real RefSR pair (see :mod:`amsa.demo`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amsa",
        description="AMSA (AAAI-22) reference-based super-resolution: Triton kernels and tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="match a real RefSR pair with CFE-PatchMatch and enumerated matching; print a table and "
        "write correspondences.png, convergence.png and results.csv",
        description="CFE-PatchMatch (paper and official schedules) vs enumerated matching on a RefSR pair "
        "cut from matplotlib's grace_hopper.jpg (HR crop, 4x bicubic LR-up query, rescaled and shifted "
        "reference taken down-up 4x). Prints a table and writes results.csv, correspondences.png and "
        "convergence.png.",
    )
    demo.add_argument("--out", default=os.path.join("out", "demo"), help="output folder (default: out/demo)")
    demo.add_argument(
        "--size",
        type=int,
        default=None,
        help="HR crop and reference size in pixels, a multiple of 4 (default: 256, or 96 with --quick)",
    )
    demo.add_argument("--quick", action="store_true", help="small run (96x96) for tests and CI")
    demo.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="matcher backend: auto = Triton on CUDA, PyTorch on CPU; triton on CPU runs the Triton "
        "interpreter (slow)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of PatchMatch's random initialisation")
    return parser


def _demo(args: argparse.Namespace) -> int:
    size = args.size if args.size is not None else (96 if args.quick else 256)
    if size < 32 or size % 4:
        raise SystemExit(f"amsa demo: --size must be a multiple of 4 and at least 32, got {size}")
    if args.backend == "triton":
        import torch

        if not torch.cuda.is_available():
            if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
                raise SystemExit(
                    "amsa demo: --backend triton without CUDA needs TRITON_INTERPRET=1 set at start-up"
                )
            # the interpreter must be chosen before triton is first imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
            print("amsa demo: no CUDA: Triton kernels run in the interpreter (TRITON_INTERPRET=1), slowly")
    from amsa.demo import run_demo

    run_demo(args.out, size, backend=args.backend, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m amsa`` and of the ``amsa`` script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    raise SystemExit(f"amsa: unknown command {args.command!r}")  # argparse rejects these first


if __name__ == "__main__":
    sys.exit(main())
