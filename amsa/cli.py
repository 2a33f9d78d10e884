"""Command line: ``python -m amsa <command>`` (installed as ``amsa``).

Commands:
    demo    CFE-PatchMatch vs enumerated matching on a real RefSR pair (see :mod:`amsa.demo`).
    train   train AMSA from a JSON config, on one device or under torchrun (see :mod:`amsa.training`).
    train-extractor   train the matching extractor (contrastive teacher, distilled student).
    eval-extractor    % of held-out cells matched within 2 cells of the truth: learned vs filter bank.
    eval    PSNR / SSIM (Y channel) on CUFED5 (per reference level) or a folder (see :mod:`amsa.evaluation`).
    sr      super-resolve one LR image with one or more references.

Handlers import what they need when they run, so the demo's interpreter switch can still come before
triton is first imported.
"""

from __future__ import annotations

import argparse
import os
import sys

from amsa.backends import BACKENDS


def add_run_args(p: argparse.ArgumentParser, presets: str) -> None:
    """--config, --resume, --out of a training command."""
    p.add_argument("--config", required=True, help=f"JSON config (see {presets})")
    p.add_argument(
        "--resume", default=None, help="checkpoint.pt to continue from, or 'auto' (out_dir's, if any)"
    )
    p.add_argument("--out", default=None, help="override the config's out_dir")


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
        choices=BACKENDS,
        default="auto",
        help="matcher backend: auto = Triton on CUDA, the numba kernels on CPU; torch = the PyTorch path; "
        "triton on CPU runs the Triton interpreter (slow)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of PatchMatch's random initialisation")

    tr = sub.add_parser(
        "train",
        help="train AMSA from a JSON config (one device; several GPUs with torchrun)",
        description="Train AMSA. One device: python -m amsa train --config FILE. Several GPUs: torchrun "
        "--nproc_per_node=N -m amsa train --config FILE. Writes checkpoint.pt, restoration.pth, config.json "
        "and log.jsonl to the config's out_dir.",
    )
    add_run_args(tr, "configs/")

    te = sub.add_parser(
        "train-extractor",
        help="train the matching extractor: stage teacher (contrastive) or student (LR-up, distilled)",
        description="Train the matching extractor (ContrasExtractorSep) of one stage from a JSON config "
        "(configs/extractor_*.json); one device, or torchrun for several. Writes checkpoint.pt, "
        "feature_extraction.pth (loads into amsa.AMSA(feature_weights=...)), config.json and log.jsonl.",
    )
    add_run_args(te, "configs/extractor_*.json")

    ee = sub.add_parser(
        "eval-extractor",
        help="matching accuracy on held-out pairs with known geometry: learned vs filter bank vs random",
        description="On the held-out pairs of a config's val_data: the % of LR-up cells whose exact and "
        "CFE-PatchMatch matches lie within 2 cells of the true correspondence, for the given extractor "
        "weights, the fixed filter bank and random-weight extractors.",
    )
    ee.add_argument("--config", required=True, help="a train-extractor config whose val_data names the pairs")
    ee.add_argument("--feature-weights", default="@learned",
                    help="extractor weights (default @learned: the one shipped with the package)")
    ee.add_argument("--json", default=None, help="also write the numbers to this JSON file")

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--weights", required=True, help="restoration.pth / checkpoint.pt of a run, or official .pth"
        )
        p.add_argument(
            "--model-config",
            default=None,
            help="JSON of AMSA arguments or a training config (default: config.json beside --weights, else "
            "the official size)",
        )
        p.add_argument(
            "--feature-weights", default=None,
            help="matching extractor weights (feature_extraction.pth, or @learned: the one shipped with the "
            "package; default: the run's config, else @learned)",
        )
        p.add_argument("--vgg-weights", default=None, help="VGG19 weights (torchvision or official layout)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")

    ev = sub.add_parser(
        "eval",
        help="PSNR / SSIM on the Y channel (crop 4) on CUFED5 or a folder of photos",
        description="Evaluate a model: PSNR and SSIM on the MATLAB Y channel, crop border 4, SSIM 11x11 "
        "Gaussian (sigma 1.5), per image and mean; on CUFED5 per reference level.",
    )
    add_model_args(ev)
    data = ev.add_mutually_exclusive_group(required=True)
    data.add_argument("--cufed5", default=None, help="CUFED5 folder (NNN_0.png HR, NNN_1..5.png references)")
    data.add_argument("--self-ref", default=None, help="folder of photos: self-reference pairs (seeded)")
    ev.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="CUFED5 reference levels")
    ev.add_argument("--gt-size", type=int, default=160, help="HR crop size of --self-ref pairs")
    ev.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    ev.add_argument("--csv", default=None, help="write per-image rows and means to this CSV")
    ev.add_argument("--save-dir", default=None, help="save the SR images here")

    sr = sub.add_parser(
        "sr",
        help="super-resolve one LR image 4x with one or more references",
        description="4x RefSR of one image: python -m amsa sr --lr LR.png --ref REF.png [--ref ...] "
        "--weights CKPT --out SR.png. The output is written atomically.",
    )
    sr.add_argument("--lr", required=True, help="the low-resolution image")
    sr.add_argument("--ref", required=True, action="append", help="a reference image (repeat for several)")
    sr.add_argument("--out", required=True, help="output image (.png recommended)")
    add_model_args(sr)
    return parser


def _demo(args: argparse.Namespace) -> int:
    size = args.size if args.size is not None else (96 if args.quick else 256)
    if size < 32 or size % 4:
        raise SystemExit(f"amsa demo: --size must be a multiple of 4 and at least 32, got {size}")
    if args.backend == "triton":
        import torch

        if not torch.cuda.is_available():
            from amsa.backends import interpreting

            if "triton" in sys.modules and not interpreting():
                raise SystemExit(
                    "amsa demo: --backend triton without CUDA needs TRITON_INTERPRET=1 set at start-up"
                )
            # the interpreter must be chosen before triton is first imported
            os.environ.setdefault("TRITON_INTERPRET", "1")
            print("amsa demo: no CUDA: Triton kernels run in the interpreter (TRITON_INTERPRET=1), slowly")
    from amsa.demo.run import run_demo

    run_demo(args.out, size, backend=args.backend, seed=args.seed)
    return 0


def _device(name: str | None):
    import torch

    return torch.device(name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_model(args: argparse.Namespace):
    from amsa.evaluation.evaluate import load_model

    return load_model(
        args.weights,
        model_config=args.model_config,
        feature_weights=args.feature_weights,
        vgg_weights=args.vgg_weights,
        device=_device(args.device),
    )


def _train(args: argparse.Namespace) -> int:
    from amsa.training.loop import main_train

    return main_train(args.config, resume=args.resume, out_dir=args.out)


def _train_extractor(args: argparse.Namespace) -> int:
    from amsa.training.extractor import main_train_extractor

    return main_train_extractor(args.config, resume=args.resume, out_dir=args.out)


def _eval_extractor(args: argparse.Namespace) -> int:
    from amsa.training.correspondence import main_eval_extractor

    return main_eval_extractor(args.config, args.feature_weights, json_path=args.json)


def _eval(args: argparse.Namespace) -> int:
    from amsa.evaluation.evaluate import evaluate
    from amsa.training.data import CUFED5TestSet, SelfReferenceSet

    if args.cufed5 is not None:
        dataset = CUFED5TestSet(args.cufed5, levels=args.levels)
    else:
        dataset = SelfReferenceSet(args.self_ref, gt_size=args.gt_size, augment_data=False)
    model = _load_model(args)

    def show(row) -> None:
        level = "" if row.level is None else f" L{row.level}"
        print(f"{row.name}{level}: PSNR {row.psnr:.3f} dB, SSIM {row.ssim:.4f}")

    result = evaluate(model, dataset, max_images=args.max_images, save_dir=args.save_dir, progress=show)
    print(result.table())
    if args.csv:
        result.write_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


def _sr(args: argparse.Namespace) -> int:
    from PIL import Image

    from amsa.evaluation.evaluate import super_resolve
    from amsa.io import atomic_write, load_image, save_image

    ext = os.path.splitext(args.out)[1].lower()
    if ext not in Image.registered_extensions():
        raise ValueError(f"--out {args.out!r}: unknown image extension {ext!r} (use .png)")
    lr = load_image(args.lr)
    refs = [load_image(p) for p in args.ref]
    model = _load_model(args)
    out = super_resolve(model, lr, refs)
    atomic_write(args.out, lambda p: save_image(out, p))
    print(f"wrote {args.out} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m amsa`` and of the ``amsa`` script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    commands = {"demo": _demo, "train": _train, "train-extractor": _train_extractor,
                "eval-extractor": _eval_extractor, "eval": _eval, "sr": _sr}
    if args.command in commands:
        from amsa.models import CheckpointError

        try:
            return commands[args.command](args)
        except (FileNotFoundError, CheckpointError, ValueError) as exc:
            # bad input: one clear line, no traceback (no output is half-written: outputs are atomic)
            raise SystemExit(f"amsa {args.command}: error: {exc}") from exc
    raise SystemExit(f"amsa: unknown command {args.command!r}")  # argparse rejects these first
