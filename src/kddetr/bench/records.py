"""Benchmark run records: what is committed of each run (config, per-epoch metrics, test AP; never weights)."""
from __future__ import annotations

import json
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from kddetr.config import Config, flatten, from_dict, load_config, migrate_saved_config, to_dict
from kddetr.errors import UserError
from kddetr.viz import read_metrics

MANIFEST = "bench.json"
OUTPUT = "output.json"  # a benchmark that prints its tables (`kddetr bench speed`): its command and what it printed
# file in the run directory -> file in its record
RUN_FILES = {"config.yaml": "config.yaml", "metrics.jsonl": "metrics.jsonl", "test/metrics.json": "test_metrics.json"}


def save_manifest(root: Path, arch: str, schedule: str, rows: Sequence[Any], teacher: dict[str, Optional[dict]],
                  argv: Sequence[str], minutes: Optional[float] = None, kind: str = "kd",
                  teacher_arch: Optional[str] = None) -> None:
    """`root/bench.json`: the benchmark's command (`kddetr bench KIND ...`), its planned rows (variant, seed,
    slug), the teacher's AP and architecture (none for a benchmark without one) and, once the benchmark has
    finished in one invocation, its wall time."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"command": f"kddetr bench {kind} " + shlex.join(argv), "kind": kind, "arch": arch,
                "schedule": schedule, "rows": [{"variant": r.variant, "seed": r.seed, "slug": r.slug} for r in rows],
                "teacher": teacher, "teacher_arch": teacher_arch, "minutes": minutes}
    _write(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def save_run(run: Path, dest: Path) -> None:
    """Copy a finished run's records into `dest` (each file written whole: a kill leaves the old one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for source, name in RUN_FILES.items():
        if (run / source).is_file():
            _write(dest / name, (run / source).read_text())
    command = run.parent / f"{run.name}.command.json"
    if command.is_file():
        _write(dest / "command.json", command.read_text())


def save_output(root: Path, command: str, output: str) -> None:
    """`root/output.json`: a printing benchmark's command and its printed tables, as one record."""
    root.mkdir(parents=True, exist_ok=True)
    _write(root / OUTPUT, json.dumps({"command": command, "output": output}, indent=1) + "\n")


def print_and_record(bench: str, argv: Optional[Sequence[str]], output: str, records: Optional[Path]) -> None:
    """Print a printing benchmark's tables and, with `records`, save them with its command line."""
    print(output)
    if records:
        save_output(records, f"kddetr bench {bench} " + shlex.join(argv if argv is not None else sys.argv[1:]), output)


@dataclass
class Printed:
    """A printing benchmark's record: the command and what it printed."""
    name: str
    command: str
    output: str


def load_output(root: Path) -> Printed:
    record = json.loads((root / OUTPUT).read_text())
    return Printed(root.name, record["command"], record["output"])


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)


@dataclass
class RunRecord:
    """One committed run: its per-epoch records (val AP where evaluated) and its final test AP."""
    variant: str
    seed: Optional[int]
    slug: str
    epochs: list[dict] = field(default_factory=list)
    test: Optional[dict] = None
    config: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.test is not None

    @property
    def final_val(self) -> dict:
        evaluated = [r for r in self.epochs if "AP" in r]
        return evaluated[-1] if evaluated else {}

    @property
    def steps(self) -> int:
        return self.epochs[-1]["step"] if self.epochs else 0

    @property
    def s_per_step(self) -> float:
        times = [r["s_per_step"] for r in self.epochs if "s_per_step" in r]
        return statistics.median(times) if times else float("nan")

    @property
    def label(self) -> str:
        return self.variant + ("" if self.seed is None else f", seed {self.seed}")


@dataclass
class Bench:
    """A benchmark's records: its manifest and one `RunRecord` per planned row (empty where not run yet)."""
    name: str
    command: str
    arch: str
    schedule: str
    teacher: dict[str, Optional[dict]]
    runs: list[RunRecord]
    minutes: Optional[float] = None
    kind: str = "kd"  # the benchmark that wrote it: "kd" (KD gain table) or "finetune" (--init against none)
    teacher_arch: Optional[str] = None  # the teacher checkpoint's `model.arch` (`--arch` names the student's recipe)

    @property
    def split(self) -> str:
        """The split the table reports: test where the teacher or a run was evaluated on it, else val."""
        return "test" if self.teacher.get("test") or any(r.test for r in self.runs) else "val"


def load_bench(root: Path) -> Bench:
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise UserError(f"{manifest_file}: not found; not a benchmark records directory")
    manifest = json.loads(manifest_file.read_text())
    runs = [load_run(root / row["slug"], row["variant"], row["seed"]) for row in manifest["rows"]]
    return Bench(root.name, manifest["command"], manifest["arch"], manifest["schedule"], manifest["teacher"], runs,
                 manifest.get("minutes"), manifest.get("kind", "kd"), manifest.get("teacher_arch"))


def load_run(folder: Path, variant: str, seed: Optional[int]) -> RunRecord:
    """One row's record from its folder; a row not run yet (no folder) gives an empty record."""
    record = RunRecord(variant, seed, folder.name)
    if (folder / "metrics.jsonl").is_file():
        record.epochs = read_metrics(folder)
    if (folder / "test_metrics.json").is_file():
        record.test = json.loads((folder / "test_metrics.json").read_text())
    if (folder / "config.yaml").is_file():
        record.config = yaml.safe_load((folder / "config.yaml").read_text())
    return record


def config_drift(folder: Path) -> list[str]:
    """Where a run record's config differs from the one its command (`command.json`: config file and overrides)
    makes with this checkout's config files and defaults, as `key: recorded -> today` lines (options
    removed since are migrated first); empty when they agree or the record holds no such command and config."""
    command, saved = folder / "command.json", folder / "config.yaml"
    if not (command.is_file() and saved.is_file()):
        return []
    recipe = json.loads(command.read_text())
    if "config" not in recipe:
        return []
    data = migrate_saved_config(yaml.safe_load(saved.read_text()))
    data.pop("dataset", None)
    recorded = flatten(to_dict(from_dict(Config, data, str(saved))))
    today = flatten(to_dict(load_config(recipe["config"], recipe.get("overrides", []))))
    return [f"{key}: {recorded.get(key)!r} -> {today.get(key)!r}"
            for key in sorted(recorded.keys() | today.keys()) if recorded.get(key) != today.get(key)]


def recorded_minutes(root: Path) -> Optional[float]:
    """The wall time stored in `root`'s manifest, if any."""
    manifest = root / MANIFEST
    return json.loads(manifest.read_text()).get("minutes") if manifest.is_file() else None
