"""KD gain benchmark: no-KD student, Hungarian KD and KD-DETR ablations on the same schedule and seed, per detector."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

from kddetr.bench import records
from kddetr.errors import UserError
from kddetr.registry import REGISTRY, spec
from kddetr.viz import read_metrics

# name -> (command, extra --set overrides); every student run shares the student config, schedule and seed.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "student (no KD)": ("train", []),
    "Hungarian KD": ("distill", ["kd.method=hungarian"]),
    "KD-DETR general": ("distill", ["kd.specific_points=false"]),
    "KD-DETR specific": ("distill", ["kd.general_points=0"]),
    "KD-DETR general+specific, no FRW": ("distill", ["kd.foreground_reweight=false"]),
    "KD-DETR general+specific": ("distill", []),
}
DEMO_VARIANTS = ("student (no KD)", "KD-DETR general+specific")
SEEDED_VARIANTS = DEMO_VARIANTS  # the rows a claim rests on: run under every --seeds seed
# the architectures with an embedded teacher and student pair (the registry's); a shipped teacher is used as it is,
# else the teacher is trained first into OUT/teacher
ARCHS = [arch for arch, entry in REGISTRY.items() if entry.teacher_config and entry.student_config]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


@dataclass(frozen=True)
class Row:
    """One run of the benchmark: a variant, under a training seed (None: the config's seed)."""
    variant: str
    seed: Optional[int] = None

    @property
    def slug(self) -> str:
        return _slug(self.variant) + ("" if self.seed is None else f"_seed{self.seed}")


def plan_rows(variants: Sequence[str], seeds: Sequence[int], seeded: Sequence[str]) -> list[Row]:
    """In the order of `variants`: each under the first seed, the `seeded` ones under every seed."""
    if not seeds:
        return [Row(v) for v in variants]
    return [Row(v, s) for v in variants for s in (seeds if v in seeded else seeds[:1])]


def schedule_overrides(schedule: str, teacher: Path) -> list[str]:
    """`full`: the teacher's epochs and learning-rate drop (from its checkpoint's config.yaml), evaluated every
    2 epochs for the curves; `short`: the student config's own schedule."""
    if schedule == "short":
        return []
    config = teacher / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config}: not found; --schedule full takes the teacher checkpoint's schedule from it")
    train = (yaml.safe_load(config.read_text()) or {}).get("train", {})
    if "epochs" not in train:
        raise UserError(f"{config}: train.epochs missing; --schedule full needs the teacher's schedule")
    drops = ",".join(str(e) for e in train.get("lr_drop_epochs", []))
    return [f"train.epochs={train['epochs']}", f"train.lr_drop_epochs=[{drops}]", "train.eval_every=2"]


def device_flags(device: str) -> list[str]:
    """`kddetr` flags of a run on `device`: none on the CPU, so CPU recipes (and their records) stay as they were."""
    return [] if device == "cpu" else ["--device", device]


def row_recipe(row: Row, config: Path, teacher: Path, data: Path, overrides: Sequence[str],
               device: str = "cpu", teacher_overrides: Sequence[str] = ()) -> dict:
    """What starts the row's run: its `kddetr` command, config, data, teacher and `teacher_overrides` (when it
    distils), overrides (seed and variant included) and device. A run, or a committed record, is only taken for the
    row when its recipe is this one."""
    command, extra = VARIANTS[row.variant]
    seed = [] if row.seed is None else [f"train.seed={row.seed}"]
    teacher_flags = [flag for item in teacher_overrides for flag in ("--teacher-set", item)]
    flags = [*device_flags(device), *(teacher_flags if command == "distill" else [])]
    return recipe(command, config, data, teacher if command == "distill" else None, [*overrides, *seed, *extra],
                  flags)


def same_recipe(started: dict, wanted: dict) -> bool:
    """Whether a run or record `started` by one recipe stands for `wanted`. A `train` run never reads a teacher:
    the one that older no-KD records name (the bench's teacher then) does not tell them apart."""
    if started.get("command") == wanted.get("command") == "train":
        started = started | {"teacher": wanted.get("teacher")}
    return started == wanted


def recipe(command: str, config: Path, data: Path, teacher: Optional[Path], overrides: Sequence[str],
           flags: Sequence[str] = ()) -> dict:
    """A run's starting command as data; `flags` are further `kddetr` options (e.g. `--init CKPT`)."""
    wanted = {"command": command, "config": str(config), "data": str(data),
              "teacher": None if teacher is None else str(teacher), "overrides": list(overrides)}
    return wanted | ({"flags": list(flags)} if flags else {})


def run_row(row: Row, config: Path, teacher: Path, data: Path, out: Path, overrides: Sequence[str],
            threads: int, device: str = "cpu", teacher_overrides: Sequence[str] = ()) -> Path:
    run = run_recipe(row.slug, row_recipe(row, config, teacher, data, overrides, device, teacher_overrides), out,
                     threads)
    evaluate_split(run / "last", data, "test", run / "test" / "metrics.json", threads, device)
    return run


def recorded(row: Row, wanted: dict, root: Optional[Path]) -> Optional[records.RunRecord]:
    """The row's committed record in `root` when it holds a finished run (test AP) started by `wanted` with the config
    that recipe makes today: such a row is not trained again (weights are never committed, so a fresh clone has
    only the records)."""
    if root is None:
        return None
    folder = root / row.slug
    command = folder / "command.json"
    if not (command.is_file() and (folder / "test_metrics.json").is_file()):
        return None
    if not same_recipe(json.loads(command.read_text()), wanted):
        return None
    drift = records.config_drift(folder)
    if drift:
        print(f"{folder}: recorded with another config than {wanted['config']} makes today ({'; '.join(drift)}); "
              "trained again", flush=True)
        return None
    return records.load_run(folder, row.variant, row.seed)


def evaluate_split(checkpoint: Path, data: Path, split: str, out: Path, threads: int,
                   device: str = "cpu") -> Optional[dict]:
    """`kddetr eval` of `checkpoint` on `split` into `out` (kept when already there); None when the data has no
    such split."""
    if not (data / "annotations" / f"instances_{split}.json").is_file():
        return None
    if not out.is_file():
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, "-m", "kddetr", "eval", str(checkpoint), "--data", str(data), "--split",
                        split, "--out", str(out), "--no-progress", *device_flags(device)],
                       check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads(out.read_text())


def run_recipe(slug: str, wanted: dict, out: Path, threads: int) -> Path:
    """`kddetr train|distill` as `wanted` (a `recipe`) into `out/slug` (resumed if started, reused if finished);
    returns the run dir.

    A run is only resumed or reused when it was started by the same recipe, recorded in `out/slug.command.json`:
    another teacher must not pass for this one.
    """
    run = out / slug
    record = out / f"{slug}.command.json"
    if (run / "last").is_dir() and record.is_file() and not same_recipe(json.loads(record.read_text()), wanted):
        raise UserError(f"{run}: started by another command ({record}: {record.read_text().strip()}); "
                        "use another --out or delete the run")
    if finished(run):
        return run  # reuse a finished run
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted) + "\n")
    command = wanted["command"]
    args = [sys.executable, "-m", "kddetr", command, wanted["config"], "--data", wanted["data"], "--out", str(run),
            "--no-progress"]
    if command == "distill":
        args += ["--teacher", wanted["teacher"]]
    args += wanted.get("flags", [])
    if (run / "last").is_dir():
        args.append("--resume")
    for item in wanted["overrides"]:
        args += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$ " + " ".join(args[1:]).replace(sys.executable, "python"), flush=True)
    with open(out / f"{slug}.log", "w") as log:
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run


def ensure_teacher(arch: str, teacher: Optional[Path], data: Path, out: Path, overrides: Sequence[str],
                   threads: int, device: str = "cpu") -> Path:
    """The teacher checkpoint: `teacher` if given, the arch's shipped one, else trained from its config into
    `out/teacher` (best checkpoint, or last when it never evaluated better)."""
    entry = spec(arch)
    if teacher is not None or entry.shipped_teacher is not None:
        return teacher or entry.shipped_teacher  # type: ignore[return-value]
    run = run_recipe("teacher", recipe("train", entry.teacher_config, data, None, overrides, device_flags(device)),
                     out, threads)
    return run / "best" if (run / "best").is_dir() else run / "last"


def checkpoint_arch(checkpoint: Path) -> Optional[str]:
    """The `model.arch` a checkpoint's config.yaml names (None where it has none to read)."""
    config = Path(checkpoint) / "config.yaml"
    model = (yaml.safe_load(config.read_text()) or {}).get("model", {}) if config.is_file() else {}
    return model.get("arch") if isinstance(model, dict) else None


def finished(run: Path) -> bool:
    """Whether the run in `run` ran to its end: its last epoch, `max_steps` or `max_minutes` (as its config.yaml
    says), with a checkpoint and a final evaluation. A run killed midway has evaluations too: they do not count."""
    if not ((run / "last").is_dir() and (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()):
        return False
    rows = read_metrics(run)
    if not rows or "AP" not in rows[-1]:
        return False
    train = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {})
    last = rows[-1]
    return (last["epoch"] >= train.get("epochs", 0) or 0 < train.get("max_steps", 0) <= last["step"]
            or 0 < 60 * train.get("max_minutes", 0) <= last.get("time_s", 0))


def run_record(row: Row, run: Path) -> records.RunRecord:
    """A trained run's record, as `records.load_run` reads a committed one: its epochs and its test AP."""
    test = run / "test" / "metrics.json"
    return records.RunRecord(row.variant, row.seed, row.slug, read_metrics(run),
                             json.loads(test.read_text()) if test.is_file() else None)


def table(rows: list[tuple[str, dict, float]], teacher_metrics: Optional[dict]) -> str:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = ["| model | " + " | ".join(keys) + " | s/step |", "|---|" + "---|" * (len(keys) + 1)]

    def fmt(v: float) -> str:
        return "–" if v is None or v < 0 else f"{v:.1f}"

    if teacher_metrics:
        lines.append("| teacher | " + " | ".join(fmt(teacher_metrics.get(k)) for k in keys) + " | – |")
    for name, metrics, step in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(metrics.get(k)) for k in keys) + f" | {step:.3f} |")
    return "\n".join(lines)


def bar_chart(rows: list[tuple[str, dict, float]], teacher_ap: Optional[float], out: Path, split: str = "val") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in rows]
    aps = [m.get("AP", 0.0) for _, m, _ in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    bars = ax.barh(names, aps, color=["#888"] + ["#4363d8"] * (len(rows) - 1))
    ax.bar_label(bars, fmt="%.1f", padding=3)
    if teacher_ap is not None:
        ax.axvline(teacher_ap, color="#e6194b", ls="--", label=f"teacher {teacher_ap:.1f}")
        ax.legend(loc="lower right")
    ax.invert_yaxis()
    ax.set_xlabel(f"COCO AP (%) on the {split} split")
    ax.set_title("Same student, schedule and seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kddetr bench kd", description=__doc__)
    p.add_argument("--arch", choices=ARCHS, default="dab_detr",
                   help="detector of teacher and student: its configs/embedded_*.yaml pair")
    p.add_argument("--data", type=Path, default=Path("data/embedded"))
    p.add_argument("--teacher", type=Path, help="teacher checkpoint (default: assets/teacher for dab_detr, "
                                                 "else trained from the arch's teacher config into OUT/teacher)")
    p.add_argument("--config", type=Path, help="student config (default: the arch's)")
    p.add_argument("--out", type=Path, help="default: runs/bench_kd[_full] (dab_detr), runs/bench_kd_ARCH[_full]")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--demo", action="store_true", help="only the no-KD student and KD-DETR")
    p.add_argument("--schedule", choices=("short", "full"), default="short",
                   help="short: the student config's schedule; full: the teacher's (epochs and lr drop)")
    p.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="training seeds: every variant runs under the first, no-KD and KD-DETR general+specific "
                        "under all (default: 0 1 for --schedule full, the config's seed otherwise)")
    p.add_argument("--records", type=Path, help="copy each finished run's records (config, metrics, test AP; no "
                                                 "weights) here, for `kddetr bench report`")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (each gets threads/jobs threads)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every run trains and evaluates (recorded in each run's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for every run (a teacher trained here included)")
    p.add_argument("--teacher-set", dest="teacher_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the teacher checkpoint's config where it distils (as `kddetr distill --teacher-set`)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    variants = list(DEMO_VARIANTS) if args.demo else args.variants
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.schedule == "full" else [])
    rows = plan_rows(variants, seeds, SEEDED_VARIANTS)
    config = args.config or spec(args.arch).student_config
    suffix = "" if args.schedule == "short" else "_full"
    args.out = args.out or Path(("runs/bench_kd" if args.arch == "dab_detr" else f"runs/bench_kd_{args.arch}") + suffix)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, args.threads // args.jobs)
    resumed = [run for run in (*(args.out / row.slug for row in rows), args.out / "teacher")
               if (run / "last").is_dir()]  # trained partly (or wholly) by an earlier sitting
    start = time.time()
    args.teacher = ensure_teacher(args.arch, args.teacher, args.data, args.out, args.overrides, args.threads,
                                  args.device)
    overrides = [*schedule_overrides(args.schedule, args.teacher), *args.overrides]
    teacher_metrics = {split: evaluate_split(args.teacher, args.data, split, args.out / f"teacher_{split}" /
                                             "metrics.json", args.threads, args.device)
                       for split in ("val", "test")}
    manifest = dict(arch=args.arch, schedule=args.schedule, rows=rows, teacher=teacher_metrics,
                    argv=list(argv if argv is not None else sys.argv[1:]),
                    teacher_arch=checkpoint_arch(args.teacher))
    reused = {row: recorded(row, row_recipe(row, config, args.teacher, args.data, overrides, args.device,
                                            args.teacher_overrides), args.records)
              for row in rows}
    reused = {row: record for row, record in reused.items() if record is not None}
    if reused:
        print(f"{len(reused)} of {len(rows)} rows taken from their records in {args.records}: "
              + ", ".join(row.slug for row in reused), flush=True)
    if args.records:  # a wall time is only kept when nothing is trained again: it was the whole command's
        kept = records.recorded_minutes(args.records) if len(reused) == len(rows) else None
        records.save_manifest(args.records, **manifest, minutes=kept)

    def work(row: Row) -> tuple[Optional[dict], dict, float]:
        """The row's (test metrics or None, last evaluated epoch, median s/step): from its record, else trained."""
        record = reused.get(row)
        if record is None:
            run = run_row(row, config, args.teacher, args.data, args.out, overrides, threads, args.device,
                          args.teacher_overrides)
            if args.records:
                records.save_run(run, args.records / row.slug)
            record = run_record(row, run)
        return record.test, record.final_val, record.s_per_step

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(work, rows))
    split = "test" if teacher_metrics["test"] is not None else "val"
    results = [(f"{row.variant}" + ("" if row.seed is None else f", seed {row.seed}"),
                (test if split == "test" else final) or {}, step) for row, (test, final, step) in zip(rows, outcomes)]
    md = table(results, teacher_metrics[split])
    (args.out / "table.md").write_text(md + "\n")
    bar_chart(results, teacher_metrics[split].get("AP"), args.out / "kd_gain.png", split)
    print(f"COCO AP on the {split} split\n\n{md}")
    minutes = (time.time() - start) / 60
    if args.records and not reused:  # the wall time of the whole command: only when it trained every row here
        records.save_manifest(args.records, **manifest, minutes=None if resumed else minutes)
    print(f"\n{len(rows)} runs in {minutes:.1f} min; table.md and kd_gain.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
