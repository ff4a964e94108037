"""The `kddetr` command line: data, train, distill, eval, predict, plot, pretrain-backbone, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from kddetr.errors import UserError
from kddetr.interop.cli import add_import_export_parsers, run_export, run_import


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (see configs/), or a checkpoint directory whose model and "
                   "settings to train again (e.g. what `kddetr import` wrote)")
    p.add_argument("--data", type=Path, required=True, help="COCO-format dataset dir (images/, annotations/)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create (or resume)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (per process)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--init", type=Path, metavar="CKPT",
                   help="start the model (for distill: the student) from this checkpoint's weights; class rows are "
                        "mapped by category name, new classes start fresh")
    p.add_argument("--class-map", action="append", default=[], metavar="NEW=OLD",
                   help="with --init: dataset class NEW starts from checkpoint class OLD (repeatable)")
    p.add_argument("--init-partial", action="store_true",
                   help="with --init: load only the tensors that fit (other layers, query counts or sizes start "
                        "fresh) instead of stopping at the first that does not")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kddetr", description="KD-DETR: distil a big DETR into a small one.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parsers(sub)
    _add_run_parsers(sub)
    _add_tool_parsers(sub)
    add_import_export_parsers(sub)
    return parser


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the embedded COCO-format dataset")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--train", type=int, default=2000, help="training images")
    synth.add_argument("--val", type=int, default=200, help="validation images (every choice is made on val)")
    synth.add_argument("--test", type=int, default=500, help="held-out test images (results are reported on test)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--difficulty", default="easy", help="easy | hard")
    forest = data.add_parser("deepforest", help="COCO tiles from the aerial tree photos in the deepforest wheel")
    forest.add_argument("--out", type=Path, required=True)
    forest.add_argument("--tile-size", type=int, default=400)
    forest.add_argument("--val-fraction", type=float, default=0.15, help="share of the tiles in val")
    forest.add_argument("--test-fraction", type=float, default=0.2, help="share of the tiles in test")
    forest.add_argument("--seed", type=int, default=0, help="seed of the tiles' split")
    forest.add_argument("--cache", type=Path, default=None, help="where to keep the downloaded wheel")


def _add_run_parsers(sub: argparse._SubParsersAction) -> None:
    """train, distill, eval and predict."""
    train = sub.add_parser("train", help="train a detector")
    _add_run_options(train)
    distill = sub.add_parser("distill", help="distil a teacher checkpoint into a student (KD-DETR)")
    _add_run_options(distill)
    distill.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint directory")
    distill.add_argument("--teacher-set", dest="teacher_overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override the teacher checkpoint's config, e.g. model.rt_detr.point_content=proposal")

    ev = sub.add_parser("eval", help="COCO AP of a checkpoint")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--split", default="val", help="val, or test: the held-out split results are reported on")
    ev.add_argument("--out", type=Path, default=None, help="metrics JSON (results.json is written beside it)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    pr = sub.add_parser("predict", help="draw detections on images")
    pr.add_argument("checkpoint", type=Path)
    pr.add_argument("inputs", type=Path, nargs="+", help="images or directories of images")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--score-threshold", type=float, default=0.3)
    pr.add_argument("--top-k", type=int, default=None,
                    help="most detections per image (default: the checkpoint's model.num_select)")
    pr.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    """pretrain-backbone, bench and plot."""
    pt = sub.add_parser("pretrain-backbone", help="pretrain a ResNet on object/background crops (offline ImageNet stand-in)")
    pt.add_argument("--data", type=Path, required=True, help="COCO-format dataset dir")
    pt.add_argument("--arch", default="resnet18", help="resnet10 | resnet18 | resnet34 | resnet50 | resnet101")
    pt.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    pt.add_argument("--num-stages", type=int, default=4, help="ResNet stages the detector uses (3: stride 16)")
    pt.add_argument("--minutes", type=float, default=3.5, help="training time limit")
    pt.add_argument("--max-steps", type=int, default=0, help="step limit (0: none)")
    pt.add_argument("--crop-size", type=int, default=64)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser("bench", help="benchmarks: kd (KD gain table), finetune (--init against none), speed (KD overhead, vs HF, inference, "
                                         "memory, scaling tables), report (README and docs/results.md tables from committed records), "
                                         "gpu-check (is the CUDA path sound), coco-scale (COCO-sized annotations), "
                                         "teacher-points (a teacher's AP at distillation points), "
                                         "kd-gradients (the KD gradient beside the detection one)")
    bench.add_argument("name", choices=["kd", "finetune", "speed", "report", "gpu-check", "coco-scale",
                                        "teacher-points", "kd-gradients"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the benchmark (see --help)")

    pl = sub.add_parser("plot", help="loss and AP curves of one or more runs")
    pl.add_argument("runs", type=Path, nargs="+")
    pl.add_argument("--out", type=Path, required=True)
    pl.add_argument("--x", choices=["epoch", "step", "time"], default="epoch",
                    help="x axis: epochs, optimizer steps or training minutes (default: epoch)")


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "synth":
        from kddetr.data.synth import generate
        summary = generate(args.out, num_train=args.train, num_val=args.val, size=args.size, seed=args.seed,
                           difficulty=args.difficulty, num_test=args.test)
    else:
        from kddetr.data.deepforest import convert
        summary = convert(args.out, cache_dir=args.cache, tile_size=args.tile_size, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, seed=args.seed)
    print(json.dumps(summary, indent=1))


def _run_config(args: argparse.Namespace):
    from kddetr.config import load_config
    overrides = list(args.overrides)
    for flag, key in (("epochs", "train.epochs"), ("batch_size", "train.batch_size"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    from kddetr.engine.checkpoint import CONFIG_FILE, MODEL_FILE, read_checkpoint_config
    path = args.config
    if path.is_dir() or (path.name == CONFIG_FILE and (path.parent / MODEL_FILE).is_file()):
        return read_checkpoint_config(path if path.is_dir() else path.parent, overrides)[0]  # classes: not a setting
    return load_config(path, overrides)


def _check_out_dir(out: Path, resume: bool) -> bool:
    """Whether to resume: `--resume` before the run's first checkpoint starts it afresh (a requeued cluster job
    passes --resume every time)."""
    from kddetr.engine.checkpoint import recover_checkpoint
    recover_checkpoint(out / "last")  # a run killed between the two renames of a save left last.old
    if resume and not (out / "last").is_dir():
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--resume: no checkpoint in {out} yet; starting the run from the beginning")
        return False
    if not resume and (out / "last").exists():
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    return resume


def cmd_train(args: argparse.Namespace, distill: bool = False) -> None:
    from kddetr.engine.runner import run_training
    cfg = _run_config(args)
    args.resume = _check_out_dir(args.out, args.resume)
    init = None
    if args.init is not None:
        from kddetr.engine.finetune import InitRequest, parse_class_map
        init = InitRequest(args.init, parse_class_map(args.class_map), args.init_partial)
    elif args.class_map or args.init_partial:
        raise UserError("--class-map and --init-partial need --init CKPT")
    metrics = run_training(cfg, args.data, args.out, device=args.device, resume=args.resume,
                           teacher=args.teacher if distill else None, progress=not args.no_progress, init=init,
                           teacher_overrides=args.teacher_overrides if distill else ())
    from kddetr.engine.evaluate import print_metrics_table
    if metrics and int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        print(print_metrics_table(metrics, title=str(args.out)))


def cmd_eval(args: argparse.Namespace) -> None:
    from kddetr.engine.runner import evaluate_checkpoint
    evaluate_checkpoint(args.checkpoint, args.data, args.split, args.out, args.batch_size, args.device,
                        progress=not args.no_progress)


def cmd_predict(args: argparse.Namespace) -> None:
    from kddetr.engine.predict import predict
    n = predict(args.checkpoint, args.inputs, args.out, args.score_threshold, args.top_k, args.device)
    print(f"wrote {n} images and detections.json to {args.out}")


def cmd_plot(args: argparse.Namespace) -> None:
    from kddetr.viz import plot_runs
    plot_runs(args.runs, args.out, args.x)
    print(f"wrote {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from kddetr.engine.pretrain import pretrain_backbone
    summary = pretrain_backbone(args.data, args.arch, args.out, num_stages=args.num_stages, minutes=args.minutes,
                                max_steps=args.max_steps, crop_size=args.crop_size, lr=args.lr, seed=args.seed)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}; use it with --set model.backbone.weights={args.out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from kddetr.bench import coco_scale, finetune, gpu_check, kd_gain, kd_gradients, report, speed, teacher_points
    benches = {"kd": kd_gain, "finetune": finetune, "speed": speed, "report": report, "gpu-check": gpu_check,
               "coco-scale": coco_scale, "teacher-points": teacher_points, "kd-gradients": kd_gradients}
    code = benches[args.name].main(args.bench_args)
    if code:
        raise SystemExit(code)


COMMANDS = {"data": cmd_data, "train": cmd_train, "distill": lambda a: cmd_train(a, distill=True),
            "eval": cmd_eval, "pretrain-backbone": cmd_pretrain, "predict": cmd_predict, "plot": cmd_plot, "bench": cmd_bench,
            "import": run_import, "export": run_export}


def _message(e: UserError) -> str:
    """The error's own line, also when a DataLoader worker raised it (torch prepends the worker's traceback)."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"kddetr: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kddetr: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
