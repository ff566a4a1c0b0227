"""Evaluate robust classifiers (argument wiring only; the logic lives in ``robust/``).

    python evaluate.py report --model MODEL --data digits|mnist|cifar10|FOLDER [--eps 0.05 0.1] [--out DIR]
    python evaluate.py fool --image IMG --out DIR --model MODEL [--target NAME]
    python evaluate.py export --checkpoint CKPT --out DIR [--torch-export] [--onnx [--onnx-data digits|cifar10|FOLDER]]

Bad input prints one line ``error: ...`` on stderr and exits with code 2 (a traceback only with ``--debug``).
Heavy libraries are imported after the arguments are checked, so argument errors are instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robust.checks import (
    check_at_least_one,
    check_budget,
    check_quality,
    check_square_queries,
    parse_fraction,
    parse_int,
)
from robust.cli import exit_code
from robust.errors import RobustError

UNITS = (
    "eps and alpha are L-inf distances in [0, 1] pixel units (images are floats in [0, 1]): 8/255, written "
    "as a fraction or as 0.0314, is eight grey levels of an 8-bit image."
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one ``error: ...`` line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _checked(parse, check):
    """An argparse type from the library's own parse and check functions (RobustError -> usage error)."""

    def convert(text: str):
        try:
            value = parse(text)
            check(value)
        except RobustError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return convert


def _count(what: str):
    return _checked(lambda text: parse_int(text, what), lambda value: check_at_least_one(value, what))


# eps is checked against its norm once the norm is known (L∞ in [0, 1], L2 up to sqrt(C·H·W)): here only >= 0.
_eps = _checked(parse_fraction, lambda eps: check_budget(eps, norm="l2"))
_alpha = _checked(parse_fraction, lambda alpha: check_budget(0.0, alpha, norm="l2"))  # against eps's norm later
_number = _checked(parse_fraction, lambda value: None)
_quality = _checked(lambda text: parse_int(text, "JPEG quality"), check_quality)
_square_queries = _checked(lambda text: parse_int(text, "Square queries"), check_square_queries)


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--steps", type=_count("steps"), default=10, help="PGD steps (default 10)")
    sub.add_argument(
        "--norm", choices=["linf", "l2"], help="threat model (default: the one the model was trained in, else linf)"
    )
    sub.add_argument("--alpha", type=_alpha, help="PGD step size, e.g. 2/255 (default L∞ eps/4, L2 2.5·eps/steps)")
    sub.add_argument("--quality", type=_quality, default=75, help="JPEG defense quality 1..100 (default 75)")
    sub.add_argument("--seed", type=int, default=0, help="seed of random starts and targets (default 0)")
    sub.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default auto)")
    sub.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="attack the model itself, for debugging (by default attacks run on a frozen copy with BatchNorm "
        "folded into the convolutions: the same figures within float rounding, faster)",
    )


MODEL_HELP = (
    "a .ckpt, an export folder, 'imagenet', 'hf:<id>', a plain state dict file (with --arch) or a factory "
    "'package.module:function' (with --weights)"
)


def _model_options(sub: argparse.ArgumentParser) -> None:
    """The model to load, and the description of a network trained elsewhere (a state dict or a factory's)."""
    sub.add_argument("--checkpoint", "--model", dest="model", required=True, help=MODEL_HELP)
    group = sub.add_argument_group("a network trained elsewhere (a plain state dict, or a factory's network)")
    group.add_argument(
        "--arch", help="architecture of a plain state dict file: resnet18, mnist_net, preact_resnet18, …"
    )
    group.add_argument("--weights", help="state dict file for a factory's network (loaded with weights_only=True)")
    group.add_argument(
        "--mean",
        type=_number,
        nargs="+",
        help="normalization mean the network expects, one value per channel in [0, 1] pixel units (default none: 0)",
    )
    group.add_argument("--std", type=_number, nargs="+", help="normalization std per channel (default none: 1)")
    group.add_argument("--classes", nargs="+", help="class names, one per output (default 0, 1, …; or the data's)")
    group.add_argument("--image-size", type=_count("image size"), help="input size in pixels (default: the arch's)")


def external_options(args: argparse.Namespace) -> dict:
    """The model-description options the user gave (for :func:`robust.load_model`)."""
    names = {
        "arch": args.arch,
        "weights": args.weights,
        "mean": args.mean,
        "std": args.std,
        "class_names": args.classes,
        "image_size": args.image_size,
    }
    return {k: v for k, v in names.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = _Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0], parents=[debug])
    parser.set_defaults(debug=False)
    subs = parser.add_subparsers(dest="command", required=True, metavar="{report,fool,export}")

    report = subs.add_parser("report", parents=[debug], help="robustness report of a model on a data set", epilog=UNITS)
    _model_options(report)
    report.add_argument(
        "--data", required=True, help="digits, mnist, cifar10 or an image folder (one sub-folder per class)"
    )
    report.add_argument(
        "--eps",
        type=_eps,
        nargs="+",
        help="budgets in --norm's units, e.g. 0.05 8/255 (L∞) or 0.5 2.0 (L2); default: training eps",
    )
    report.add_argument("--restarts", type=_count("restarts"), default=1, help="PGD random restarts")
    report.add_argument(
        "--apgd-steps",
        type=_count("APGD steps"),
        help="APGD-CE steps (default --steps; AutoAttack's standard APGD-CE: 100)",
    )
    report.add_argument("--apgd-restarts", type=_count("APGD restarts"), help="APGD-CE restarts (default --restarts)")
    report.add_argument(
        "--no-early-exit",
        dest="early_exit",
        action="store_false",
        help="attack every image every step (by default an image the model gets wrong is not attacked "
        "and each leaves an attack at its first fooling step: the same or lower accuracy, cheaper)",
    )
    report.add_argument(
        "--square-queries",
        type=_square_queries,
        default=0,
        metavar="N",
        help="also run Square (AutoAttack's gradient-free part) with N queries as a part of the worst "
        "case: it finds what masked gradients hide (1000 closed most of the gap to AutoAttack on the "
        "FGSM-trained MNIST fgsm.pth; default 0: not run)",
    )
    report.add_argument(
        "--cascade",
        action="store_true",
        help="measure each worst case's parts on the survivors of the parts before (AutoAttack's "
        "order); the per-attack columns are then cumulative, and report.md says so",
    )
    report.add_argument("--limit", type=_count("limit"), help="evaluate N images spread evenly over the data")
    report.add_argument("--batch-size", type=_count("batch size"), default=128)
    report.add_argument("--num-workers", type=int, default=0, help="data loading processes (default 0)")
    report.add_argument("--cifar10-root", default="data/cifar10", help="where CIFAR-10 is (or is downloaded to)")
    report.add_argument("--data-root", help="mnist: the folder holding MNIST/raw (default $ROBUST_DATA, else data)")
    report.add_argument(
        "--threats",
        nargs="+",
        metavar="KEY",
        help="measure only these threats (keys of robust.threats.THREATS, e.g. clean pgd apgd "
        "pgd_worst); default: all but autoattack",
    )
    report.add_argument("--autoattack", action="store_true", help="also run AutoAttack (standard; slow)")
    report.add_argument("--out", help="output folder (default reports/<model>-<data>)")
    report.add_argument(
        "--devices",
        type=_count("devices"),
        default=1,
        help="processes per node, one device of --device's type each (default 1)",
    )
    report.add_argument(
        "--num-nodes", type=_count("number of nodes"), default=1, help="nodes (under torchrun or SLURM; default 1)"
    )
    report.add_argument(
        "--resume", action="store_true", help="reuse the counts of batches a killed run of the same report finished"
    )
    _common(report)
    report.set_defaults(func=run_report)

    fool = subs.add_parser("fool", parents=[debug], help="fool one image, then defend it with JPEG", epilog=UNITS)
    fool.add_argument("--image", required=True, help="any common image file (JPEG, PNG, GIF, ...)")
    fool.add_argument("--out", required=True, help="output folder")
    _model_options(fool)
    fool.add_argument("--target", help="target class name or id (default: untargeted)")
    fool.add_argument("--attack", choices=["fgsm", "pgd"], default="pgd")
    fool.add_argument(
        "--eps",
        type=_eps,
        default=8 / 255,
        help="budget in --norm's units, e.g. 0.03 or 8/255 (L∞; default 8/255), 2.0 (L2)",
    )
    _common(fool)
    fool.set_defaults(func=run_fool)

    export = subs.add_parser("export", parents=[debug], help="export a checkpoint as a deployable model folder")
    export.add_argument("--checkpoint", required=True, help="a Lightning .ckpt")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--torch-export", action="store_true", help="also write a torch.export program (model.pt2)")
    export.add_argument(
        "--onnx", action="store_true", help="also write model.onnx, checked in onnxruntime (extra robust[onnx])"
    )
    export.add_argument(
        "--onnx-data",
        help="images for the onnxruntime check: digits, cifar10 or an image folder "
        "(default: the digits for a digits model, else seeded random images)",
    )
    export.set_defaults(func=run_export)
    return parser


def threat_model(args: argparse.Namespace, card, default_eps) -> tuple[str, list[float] | None]:
    """The norm (``--norm``, else the one the model was trained in) and the eps list (``--eps``, else the training
    eps when the norms agree), each eps checked against its norm."""
    trained = card.training.norm or "linf"
    norm = args.norm or trained
    eps = args.eps if isinstance(args.eps, list) else [args.eps]
    if args.eps is None and default_eps is not None:
        if norm != trained:
            raise RobustError(f"the model was trained in {trained}: give --eps for its {norm} evaluation")
        eps = [default_eps(card)]
    for value in eps:
        check_budget(value, args.alpha, norm=norm, dims=card.channels * card.image_size**2)
    return norm, eps


def run_report(args: argparse.Namespace) -> None:
    from robust import load_model
    from robust.cli_defaults import default_eps, default_out, pick_device, report_folder, report_journal
    from robust.data.eval_data import data_class_names, eval_data
    from robust.evaluation import report as rep
    from robust.evaluation.render import markdown_table, write_report
    from robust.evaluation.sharding import launch

    world = launch(pick_device(args.device), args.devices, args.num_nodes)
    with world.rank_zero_first():  # downloads happen once
        external = external_options(args)
        model = load_model(args.model, **external).to(world.device)
        names = data_class_names(args.data)
        if external and "class_names" not in external and len(names or ()) == model.card.num_classes:
            model.card.class_names = list(names)  # a network trained elsewhere on this data: its classes
        loader, data_info = eval_data(
            args.data, model.card, args.limit, args.batch_size, args.num_workers, args.cifar10_root, args.data_root
        )
    norm, eps = threat_model(args, model.card, default_eps)
    model_info = rep.model_identity(args.model, model)
    out, notice = report_folder(
        Path(args.out) if args.out else default_out(args.model, args.data), model_info, bool(args.out)
    )
    if notice and world.rank == 0:
        print(notice)
    journal = report_journal(out, model_info, data_info, args.batch_size, world.device, args.resume)
    results = rep.evaluate(
        model,
        loader,
        eps,
        args.steps,
        args.alpha,
        args.restarts,
        args.quality,
        args.autoattack,
        args.seed,
        world=world,
        journal=journal,
        threats=args.threats,
        norm=norm,
        apgd_steps=args.apgd_steps,
        apgd_restarts=args.apgd_restarts,
        early_exit=args.early_exit,
        cascade=args.cascade,
        square_queries=args.square_queries,
        fast_path=args.fast_path,
    )
    if world.rank == 0:
        report = rep.build_report(results, model_info, data_info)
        paths = write_report(report, out)
        journal.clear()
        print(markdown_table(report))
        print("wrote: " + ", ".join(str(p) for p in paths))


def run_fool(args: argparse.Namespace) -> None:
    from robust import load_model
    from robust.cli_defaults import pick_device
    from robust.data.images import load_image
    from robust.evaluation.fool import fool, summary, write_fool

    model = load_model(args.model, **external_options(args)).to(pick_device(args.device))
    x = load_image(args.image, model.card.image_size, model.card.resize, model.card.channels)
    norm, _ = threat_model(args, model.card, None)
    attack = (args.target, args.attack, args.eps, args.steps, args.alpha, args.quality, args.seed, norm)
    result = fool(model, x, *attack, fast_path=args.fast_path)
    paths = write_fool(result, args.out)
    print(summary(result))
    print("wrote: " + ", ".join(str(p) for p in paths))


def run_export(args: argparse.Namespace) -> None:
    if args.onnx_data and not args.onnx:
        raise RobustError("--onnx-data only applies with --onnx")
    from robust.export.folder import export_model

    folder = export_model(args.checkpoint, args.out, args.torch_export, args.onnx, args.onnx_data)
    print(f"exported {args.checkpoint} to {folder}")
    if args.onnx:
        from robust.models.card import ModelCard
        from robust.models.resolve import CARD_FILE

        onnx = ModelCard.from_json((folder / CARD_FILE).read_text(), CARD_FILE).onnx
        print(
            f"model.onnx: opset {onnx['opset']}, max |logit difference| to torch "
            f"{onnx['check']['max_abs_logit_diff']:.2g} on {onnx['check']['data']['n']} "
            f"{onnx['check']['data']['name']} images in onnxruntime"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    eps = getattr(args, "eps", None)
    for value in eps if isinstance(eps, list) else [] if eps is None else [eps]:
        if getattr(args, "norm", None) == "linf" and value > 1:  # instant; the model's own norm is known only later
            parser.error(f"argument --eps: eps must be in [0, 1] (L∞ pixel units, e.g. 8/255), got {value:g}")
    return exit_code(lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
