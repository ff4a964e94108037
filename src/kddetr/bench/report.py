"""`kddetr bench report`: every results table and curve of the README and docs/results.md, regenerated from committed
run records."""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from kddetr.bench.records import MANIFEST, OUTPUT, Bench, Printed, RunRecord, config_drift, load_bench, load_output
from kddetr.errors import UserError

KEYS = ("AP", "AP50", "AP75", "APs", "APm")
EARLY_STEPS = 500  # a fine-tune's early mark: what `--init` reaches by then
# a block names one benchmark's records, or (a comparison) several: comma-separated names or globs of names, or
# (`glance:`) one line per pair: comma-separated rows, each `+`-joined names or globs
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.*/,+:\[\]!-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
MARKER = re.compile(r"<!-- results:.*?-->")  # every opening marker, a well-formed block's or not
GLANCE = "glance:"
ALONE, KD_DETR = "student (no KD)", "KD-DETR general+specific"


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None or value < 0 else f"{value:.1f}"


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def results_table(bench: Bench) -> str:
    """The benchmark's markdown table (test AP, the last val AP beside it) and its gains, from the records only."""
    split = bench.split
    header = f"| model | seed | {split} AP | " + " | ".join(KEYS[1:]) + " | val AP | steps | s/step |"
    lines = [header, "|---|---|" + "---:|" * (len(KEYS) + 3)]
    teacher = bench.teacher.get(split) or {}
    if teacher:
        lines.append("| teacher | – | " + " | ".join(_fmt(teacher.get(k)) for k in KEYS)
                     + f" | {_fmt((bench.teacher.get('val') or {}).get('AP'))} | – | – |")
    for variant in dict.fromkeys(r.variant for r in bench.runs):
        runs = [r for r in bench.runs if r.variant == variant]
        for run in runs:
            lines.append(_run_line(run, split))
        done = [r for r in runs if r.finished]
        if len(runs) > 1 and len(done) == len(runs):
            means = {k: _mean([_split_metrics(r, split)[k] for r in done]) for k in KEYS}
            val = _mean([r.final_val.get("AP", 0.0) for r in done])
            seeds = ", ".join(str(r.seed) for r in done)
            lines.append(f"| **{variant}** | mean of {seeds} | " + " | ".join(f"**{_fmt(means[k])}**" if k == "AP"
                         else _fmt(means[k]) for k in KEYS) + f" | {_fmt(val)} | {done[0].steps} | – |")
    timing = [] if bench.minutes is None else [f"- wall time of the whole command: {bench.minutes:.1f} min"]
    summary = finetune_gains(bench, split) if bench.kind == "finetune" else gains(bench, split)
    return "\n".join(lines + ["", *summary, *timing])


def _split_metrics(run: RunRecord, split: str) -> dict:
    return (run.test if split == "test" else run.final_val) or {}


def _run_line(run: RunRecord, split: str) -> str:
    seed = "config" if run.seed is None else str(run.seed)
    if not run.finished:
        state = f"running: {run.steps} steps recorded" if run.epochs else "not run yet"
        return f"| {run.variant} | {seed} | {state} |" + " |" * (len(KEYS) + 2)
    m = _split_metrics(run, split)
    return (f"| {run.variant} | {seed} | " + " | ".join(_fmt(m.get(k)) for k in KEYS)
            + f" | {_fmt(run.final_val.get('AP'))} | {run.steps} | {run.s_per_step:.3f} |")


def _seed_aps(bench: Bench, variant: str, split: str) -> Optional[dict[Optional[int], float]]:
    """AP of a variant per seed (None when any of its runs is unfinished)."""
    runs = [r for r in bench.runs if r.variant == variant]
    if not runs or not all(r.finished for r in runs):
        return None
    return {r.seed: _split_metrics(r, split)["AP"] for r in runs}


def gains(bench: Bench, split: str) -> list[str]:
    """KD-DETR (general+specific) against no KD, Hungarian KD and the teacher, on the seeds both rows share."""
    kd = _seed_aps(bench, KD_DETR, split)
    if kd is None:
        return ["KD-DETR general+specific: not finished yet."]
    lines = []
    for other in (ALONE, "Hungarian KD"):
        base = _seed_aps(bench, other, split)
        common = [s for s in kd if base is not None and s in base]
        if common:
            gain = _mean([kd[s] - base[s] for s in common])  # type: ignore[index]
            per_seed = ", ".join(f"{kd[s] - base[s]:+.1f}" for s in common)  # type: ignore[index]
            lines.append(f"- KD-DETR general+specific − {other}: **{gain:+.1f} AP** on {split} "
                         + (f"(mean of seeds {', '.join(map(str, common))}: {per_seed})" if len(common) > 1
                            else "(the config's seed)" if common[0] is None else f"(seed {common[0]})"))
    teacher = (bench.teacher.get(split) or {}).get("AP")
    if teacher is not None:
        lines.append(f"- teacher − KD-DETR general+specific: {teacher - _mean(list(kd.values())):.1f} AP on {split}"
                     + (" (mean over seeds)" if len(kd) > 1 else ""))
    return lines


def finetune_gains(bench: Bench, split: str) -> list[str]:
    """`--init CKPT` against the backbone-only start: the AP difference per seed, and what the start from the
    checkpoint reached on val within `EARLY_STEPS` against the best the other start reached in all its steps."""
    init, scratch = (_seed_aps(bench, variant, split) for variant in dict.fromkeys(r.variant for r in bench.runs))
    if init is None or scratch is None:
        return ["Not finished yet."]
    names = list(dict.fromkeys(r.variant for r in bench.runs))
    common = [s for s in init if s in scratch]
    per_seed = ", ".join(f"{init[s] - scratch[s]:+.1f}" for s in common)
    lines = [f"- {names[0]} − {names[1]}: **{_mean([init[s] - scratch[s] for s in common]):+.1f} AP** on {split}"
             + (f" (per seed: {per_seed})" if len(common) > 1 else "")]
    for seed in common:
        first = next(r for r in bench.runs if r.variant == names[0] and r.seed == seed)
        other = next(r for r in bench.runs if r.variant == names[1] and r.seed == seed)
        early = [r for r in first.epochs if "AP" in r and r["step"] <= EARLY_STEPS]
        best = max((r for r in other.epochs if "AP" in r), key=lambda r: r["AP"], default=None)
        if early and best is not None:
            lines.append(f"- val AP within {EARLY_STEPS} steps: {names[0]} {max(r['AP'] for r in early):.1f}; the best "
                         f"of {names[1]} in its {other.steps} steps: {best['AP']:.1f} (step {best['step']})"
                         + ("" if seed is None else f" (seed {seed})"))
    return lines


def teacher_lines(benches: Sequence[Bench]) -> list[tuple[str, float]]:
    """One dotted line per distinct teacher val AP of `benches`, named by the first benchmark with it when they differ."""
    first: dict[float, tuple[str, float]] = {}
    for bench in benches:
        ap = (bench.teacher.get("val") or {}).get("AP")
        if ap is not None:
            first.setdefault(round(ap, 1), (bench.name, ap))
    if len(first) == 1:
        return [(f"teacher {ap:.1f}", ap) for _, ap in first.values()]
    return [(f"teacher of {name} {ap:.1f}", ap) for name, ap in first.values()]


def curves(bench: Bench, out: Path, teachers: Optional[Sequence[tuple[str, float]]] = None) -> Path:
    """Val AP against optimiser steps and against training minutes, one line per run; a dotted line per teacher
    (`teachers` as (label, val AP), default the benchmark's own)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in bench.runs:
        points = [r for r in run.epochs if "AP" in r]
        if not points:
            continue
        style = "--" if run.seed not in (None, 0) else "-"
        for ax, x in zip(axes, ([r["step"] for r in points], [r["time_s"] / 60 for r in points])):
            ax.plot(x, [r["AP"] for r in points], style, marker=".", label=run.label)
    teachers = teacher_lines([bench]) if teachers is None else teachers
    for ax, xlabel in zip(axes, ("optimiser steps", "training minutes (1 thread, shared cores)")):
        for (label, ap), color in zip(teachers, itertools.cycle(("#e6194b", "#911eb4", "#808000", "#000075"))):
            ax.axhline(ap, color=color, ls=":", label=label)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("COCO AP (%) on val")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{bench.name}: {bench.arch}" + (f", {bench.schedule} schedule" if bench.kind == "kd" else ""),
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def block(bench: Bench | Printed) -> str:
    """What a document holds between a benchmark's markers: its command and its table (or printed tables)."""
    body = bench.output.strip() if isinstance(bench, Printed) else results_table(bench)
    return f"```bash\n{bench.command}\n```\n\n{body}\n"


def find_benches(roots: Sequence[Path]) -> dict[str, Bench | Printed]:
    """Every benchmark's records under `roots`, by their folder's path below its root (e.g. `probes/kd_uniform`)."""
    benches: dict[str, Bench | Printed] = {}
    for root in roots:
        folders = sorted({p.parent for name in (MANIFEST, OUTPUT) for p in root.rglob(name)})
        if not folders:
            raise UserError(f"{root}: no benchmark records ({MANIFEST} or {OUTPUT}) in it or its folders")
        for folder in folders:
            name = folder.name if folder == root else folder.relative_to(root).as_posix()
            benches[name] = load_bench(folder) if (folder / MANIFEST).is_file() else load_output(folder)
    return benches


def drifted_records(roots: Sequence[Path]) -> list[str]:
    """One line per committed run record whose config is not what its command makes with today's configs."""
    return [f"{folder}: {'; '.join(drift)}" for root in roots for folder in sorted(p.parent for p in
            root.rglob("command.json")) if (drift := config_drift(folder))]


def is_comparison(name: str) -> bool:
    return not name.startswith(GLANCE) and ("," in name or "*" in name)


def compared(name: str, benches: dict[str, Bench | Printed]) -> list[Bench]:
    """The benchmarks a comparison block names, in its order (each glob's matches sorted)."""
    chosen = [key for pattern in name.split(",") for key in sorted(fnmatch.filter(benches, pattern))]
    found = [benches[key] for key in chosen if isinstance(benches[key], Bench)]
    if not found:
        raise UserError(f"results block {name!r} has no records")
    return found


def _kd_runs(benches: list[Bench], row: str) -> list[RunRecord]:
    """The distilled runs a glance row shows: KD-DETR general+specific where its last records have it, else their
    one distilled variant."""
    variants = list(dict.fromkeys(r.variant for b in benches for r in b.runs if r.variant != ALONE))
    if KD_DETR in variants:
        variants = [KD_DETR]
    if len(variants) != 1:
        raise UserError(f"results block glance row {row!r}: its last records hold {len(variants)} distilled "
                        f"variants ({', '.join(variants) or 'none'}); name records with one")
    return [r for b in benches for r in b.runs if r.variant == variants[0]]


def glance(name: str, benches: dict[str, Bench | Printed]) -> str:
    """One line per teacher → student pair: the student alone and distilled on the seeds both have, the gain per
    seed, the teacher and the share of the student's distance to it that the distillation closed (where the teacher
    is above the student). A row is `+`-joined records: the student-alone runs come from any of them, the distilled
    ones (and the teacher) from the last."""
    from kddetr.registry import spec
    lines = ["| teacher → student | steps | seeds | student alone | KD-DETR | gain (per seed) | teacher | gap closed "
             "| records |", "|---|---:|---|---:|---:|---|---:|---:|---|"]
    splits = set()
    for row in name.removeprefix(GLANCE).split(","):
        patterns = row.split("+")
        last = compared(patterns[-1], benches)
        alone = {r.seed: r for p in patterns for b in compared(p, benches) for r in b.runs
                 if r.variant == ALONE and r.finished}
        kd = _kd_runs(last, row)
        student = kd[0].config.get("model", {}).get("arch", last[0].arch)
        pair = f"{spec(last[0].teacher_arch or last[0].arch).name} → {spec(student).name}"
        seeds = [r.seed for r in kd if r.finished and r.seed in alone]
        split = last[0].split
        splits.add(split)
        teacher_ap = (last[0].teacher.get(split) or {}).get("AP")
        teacher = _fmt(teacher_ap)
        names = " + ".join(f"`{p}`" for p in patterns)
        if not seeds or not all(r.finished for r in kd):
            lines.append(f"| {pair} | – | – | – | running | – | {teacher} | – | {names} |")
            continue
        if any(alone[s].steps != kd[0].steps for s in seeds):
            raise UserError(f"results block glance row {row!r}: the student alone and distilled ran different "
                            f"schedules ({alone[seeds[0]].steps} and {kd[0].steps} steps)")
        kd_ap = {r.seed: _split_metrics(r, split)["AP"] for r in kd if r.seed in seeds}
        alone_ap = {s: _split_metrics(alone[s], split)["AP"] for s in seeds}
        gain, alone_mean = _mean([kd_ap[s] - alone_ap[s] for s in seeds]), _mean(list(alone_ap.values()))
        closed = f"{100 * gain / (teacher_ap - alone_mean):.0f}%" if (teacher_ap or 0) > alone_mean else "–"
        per_seed = ", ".join(f"{kd_ap[s] - alone_ap[s]:+.1f}" for s in seeds)
        gains = f"**{gain:+.1f}**" + (f" ({per_seed})" if len(seeds) > 1 else "")
        lines.append(f"| {pair} | {kd[0].steps} | {', '.join('config' if s is None else str(s) for s in seeds)} | "
                     f"{_fmt(alone_mean)} | {_fmt(_mean(list(kd_ap.values())))} | {gains} | "
                     f"{teacher} | {closed} | {names} |")
    shown = " and ".join(sorted(splits)) or "test"
    return "\n".join(lines) + (f"\n\nAP on {shown}; the student columns are means over the seeds shown; gap closed: "
                                "the gain over the teacher's lead on the student alone (– where it has none).\n")


LABEL_FLAGS = ("--set", "--teacher", "--teacher-set", "--config", "--arch")  # what may tell compared benchmarks apart


def _labels(command: str) -> list[str]:
    """A benchmark command's labelling options in its order: each `--set` by its value, the others as
    `--flag value`."""
    args = shlex.split(command)
    return [value if flag == "--set" else f"{flag} {value}" for flag, value in zip(args, args[1:])
            if flag in LABEL_FLAGS]


def _setting(bench: Bench, shared: set[str]) -> str:
    """What a compared benchmark's command sets that not all of them do (overrides, teacher, config, arch)."""
    own = [label for label in _labels(bench.command) if label not in shared]
    return ", ".join(f"`{label}`" for label in own) or "none beyond the shared ones"


def comparison(benches: list[Bench]) -> tuple[str, Bench]:
    """A table with one row per run of every benchmark, labelled by what its command sets that not all do, and a
    benchmark holding those runs (for one figure of their curves)."""
    shared = set.intersection(*(set(_labels(b.command)) for b in benches))
    lines = ["| records | setting | row | seed | val AP | test AP | steps |", "|---|---|---|---|---:|---:|---:|"]
    runs = []
    for bench in benches:
        setting = _setting(bench, shared)
        for run in bench.runs:
            seed = "config" if run.seed is None else str(run.seed)
            test = _fmt((run.test or {}).get("AP")) if run.finished else "running" if run.epochs else "not run yet"
            lines.append(f"| `{bench.name}` | {setting} | {run.variant} | {seed} | "
                         f"{_fmt(run.final_val.get('AP'))} | {test} | {run.steps} |")
            runs.append(dataclasses.replace(run, variant=f"{bench.name}: {run.variant}"))
    commands = [f"- `{bench.name}`: `{bench.command}`" for bench in benches]
    first = benches[0]
    return "\n".join(["Commands:", "", *commands, "", *lines]) + "\n", dataclasses.replace(first, runs=runs)


def update_document(text: str, benches: dict[str, Bench | Printed]) -> tuple[str, list[str]]:
    """A document's `text` with every `<!-- results:NAME -->` block regenerated; also the names of the blocks that
    changed."""
    changed: list[str] = []
    starts = {match.start() for match in BLOCK.finditer(text)}
    for marker in MARKER.finditer(text):
        if marker.start() not in starts:
            raise UserError(f"results marker {marker[0]!r} opens no block: a name of letters, digits and . * / , + : "
                            "[ ] ! -, then a line break, the table, and <!-- /results -->")

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name.startswith(GLANCE):
            body = glance(name, benches)
        elif is_comparison(name):
            body = comparison(compared(name, benches))[0]
        elif name in benches:
            body = block(benches[name])
        else:
            raise UserError(f"results block {name!r} has no records")
        if body != match["body"]:
            changed.append(name)
        return match[1] + body + match[4]

    return BLOCK.sub(replace, text), changed


def figure_name(name: str) -> str:
    """`results_NAME.png` of a block, its name made a file name."""
    return "results_" + re.sub(r"[^\w.-]+", "_", name).strip("_") + ".png"


DOCS = (Path("README.md"), Path("docs/results.md"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kddetr bench report", description=__doc__)
    p.add_argument("roots", type=Path, nargs="*", default=[Path("benchmarks/results")],
                   help="records of one benchmark (its bench.json) or folders of them")
    p.add_argument("--docs", type=Path, nargs="+", default=list(DOCS),
                   help="the markdown files whose results blocks to regenerate")
    p.add_argument("--figures", type=Path, default=Path("docs"), help="where the curves go (results_NAME.png)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when a results table is stale or a record's config is not the one "
                   "its command makes today")
    args = p.parse_args(argv)
    benches = find_benches(args.roots)
    for doc in args.docs:
        if not doc.is_file():
            raise UserError(f"{doc}: not found")
    updated = {}
    for doc in args.docs:
        try:
            updated[doc] = update_document(doc.read_text(), benches)
        except UserError as e:
            raise UserError(f"{doc}: {e}") from None
    if args.check:
        for doc, (_, changed) in updated.items():
            for name in changed:
                print(f"{doc}: results block {name!r} differs from its records", file=sys.stderr)
        drifted = drifted_records(args.roots)
        for line in drifted:
            print(f"recorded with another config than its command makes today: {line}", file=sys.stderr)
        return 1 if drifted or any(changed for _, changed in updated.values()) else 0
    for name, bench in benches.items():
        print(f"## {name}\n\n{block(bench)}")
        if isinstance(bench, Bench) and "/" not in name:
            curves(bench, args.figures / figure_name(name))
    for doc, (text, changed) in updated.items():
        for match in BLOCK.finditer(text):
            if is_comparison(match["name"]):
                chosen = compared(match["name"], benches)
                curves(comparison(chosen)[1], args.figures / figure_name(match["name"]), teacher_lines(chosen))
        doc.write_text(text)
        print(f"{doc}: {len(changed)} results block(s) updated")
    print(f"curves in {args.figures}/results_*.png")
    return 0

if __name__ == "__main__":
    sys.exit(main())
