"""Fine-tuning benchmark: one config trained from a checkpoint (`--init CKPT`) and from its backbone weights alone,
on the same data, schedule and seeds; val AP curves and test AP from committed records."""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from kddetr.bench import records
from kddetr.bench.kd_gain import Row, evaluate_split, plan_rows, recipe, recorded, run_recipe
from kddetr.config import load_config
from kddetr.errors import UserError

BACKBONE_ONLY = "backbone only"


def init_variant(checkpoint: Path) -> str:
    return f"--init {checkpoint}"


def row_recipe(row: Row, config: Path, data: Path, init: Path, init_flags: Sequence[str],
               overrides: Sequence[str]) -> dict:
    """`kddetr train` of the row: with `--init` (and its flags) unless it is the backbone-only row."""
    seed = [] if row.seed is None else [f"train.seed={row.seed}"]
    flags = [] if row.variant == BACKBONE_ONLY else ["--init", str(init), *init_flags]
    return recipe("train", config, data, None, [*overrides, *seed], flags)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kddetr bench finetune", description=__doc__)
    p.add_argument("config", type=Path, help="the model and schedule both rows train")
    p.add_argument("--init", type=Path, required=True, help="the checkpoint the first row starts from")
    p.add_argument("--class-map", action="append", default=[], metavar="NEW=OLD", help="as `kddetr train`")
    p.add_argument("--init-partial", action="store_true", help="as `kddetr train`")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/bench_finetune"))
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="training seeds, each row under every one")
    p.add_argument("--records", type=Path, help="copy each finished run's records (config, metrics, test AP; no "
                                                 "weights) here, for `kddetr bench report`")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (each gets threads/jobs threads)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both rows")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not (args.init / "config.yaml").is_file():
        raise UserError(f"{args.init}: not a kddetr checkpoint (no config.yaml); `kddetr import hf|official` makes one")
    cfg = load_config(args.config, args.overrides)  # refused here, before any run starts, when it does not load
    init_flags = [flag for item in args.class_map for flag in ("--class-map", item)]
    init_flags += ["--init-partial"] if args.init_partial else []
    variants = [init_variant(args.init), BACKBONE_ONLY]
    rows = plan_rows(variants, args.seeds, variants)
    threads = max(1, args.threads // args.jobs)
    manifest = dict(arch=cfg.model.arch, schedule="config", rows=rows, teacher={},
                    argv=list(argv if argv is not None else sys.argv[1:]), kind="finetune")
    if args.records:
        records.save_manifest(args.records, **manifest)

    def work(row: Row) -> Optional[dict]:
        """The row's test metrics (None without a test split): from its record, else trained and evaluated."""
        wanted = row_recipe(row, args.config, args.data, args.init, init_flags, args.overrides)
        record = recorded(row, wanted, args.records)
        if record is not None:
            return record.test
        run = run_recipe(row.slug, wanted, args.out, threads)
        test = evaluate_split(run / "last", args.data, "test", run / "test" / "metrics.json", threads)
        if args.records:
            records.save_run(run, args.records / row.slug)
        return test

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(work, rows))
    for row, test in zip(rows, outcomes):
        print(f"{row.variant}" + ("" if row.seed is None else f", seed {row.seed}") + ": test "
              + (json.dumps({k: round(v, 1) for k, v in test.items()}) if test else "split missing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
