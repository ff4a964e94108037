"""Speed benchmark (`kddetr bench speed`): KD overhead, ours vs HF transformers, inference, memory, scaling,
CPU threads and where a KD step's time goes.

Every number is a median over `--repeats` rounds in which the candidates of a table run interleaved (one call
of each per round), so that load on a shared machine hits them alike; the tables report ratios measured in
one run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import itertools
import shlex
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kddetr.bench.rss import peak_rss, reset_peak_rss
from kddetr.config import Config, load_config
from kddetr.data.coco import build_dataset
from kddetr.data.collate import collate
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint
from kddetr.engine.optim import fused_adamw_ok
from kddetr.errors import UserError
from kddetr.kd.distiller import Distiller
from kddetr.models.build import build_criterion, build_detector
from kddetr.models.protocol import ImageBatch, Queries
from kddetr.models.query_groups import ISOLATION_MODES
from kddetr.registry import REGISTRY, spec

TABLES = ("kd", "hf", "inference", "memory", "scaling", "loader", "threads", "ops")
Step = Callable[[], None]


@dataclasses.dataclass
class Bench:
    """What every table shares: config, one batch, the teacher, timing options."""

    cfg: Config
    device: torch.device
    amp: Optional[torch.dtype]
    images: ImageBatch
    targets: list[dict[str, Tensor]]
    num_classes: int
    teacher: nn.Module  # with --specific-points queries
    teacher_path: Path
    repeats: int
    warmup: int
    quick: bool
    compile: bool = False
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def student(self, **model_overrides: Any) -> nn.Module:
        torch.manual_seed(0)
        return build_detector(self.cfg.model.replace(**model_overrides), self.num_classes).to(self.device)

    def distiller(self, student: nn.Module, **kd_overrides: Any) -> Distiller:
        criterion = build_criterion(self.cfg.model, self.num_classes)
        return Distiller(student, self.teacher, criterion, dataclasses.replace(self.cfg.kd, **kd_overrides)).train()

    def train_step(self, model: nn.Module, loss: Callable[[], Tensor]) -> Step:
        """One optimiser step on `loss()` (forward + backward + AdamW), under autocast if asked for."""
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                fused=fused_adamw_ok(model))  # as the trainer's
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

        def run() -> None:
            with self.autocast():
                value = loss()
            opt.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
        return run

    def times(self, fns: dict[str, Step]) -> dict[str, float]:
        return median_times(fns, self.repeats, self.warmup, self.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_clock(device: torch.device) -> bool:
    """Time by this process's CPU time (immune to other processes on shared cores) when it runs on one CPU thread."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def median_times(fns: dict[str, Step], repeats: int, warmup: int = 2,
                 device: torch.device = torch.device("cpu"), wall_clock: bool = False) -> dict[str, float]:
    """Median seconds per call, candidates interleaved (one call of each per round) after `warmup` calls each."""
    clock = time.process_time if cpu_clock(device) and not wall_clock else time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def detection_loss(bench: Bench, model: nn.Module) -> Callable[[], Tensor]:
    criterion = build_criterion(bench.cfg.model, bench.num_classes)
    return lambda: sum(criterion(model(bench.images, bench.targets), bench.targets).values())


def kd_loss(bench: Bench, distiller: Callable[..., Any]) -> Callable[[], Tensor]:
    return lambda: sum(distiller(bench.images, bench.targets)[1].values())


def teacher_forward(bench: Bench) -> Step:
    def run() -> None:
        with torch.no_grad(), bench.autocast():
            bench.teacher(bench.images)
    return run


# ---- tables ----------------------------------------------------------------------------------------------
def kd_table(bench: Bench) -> str:
    """KD step against student step + teacher forward, for every isolation mode (and the optional speed-ups)."""
    student = bench.student()
    fns = {"student step": bench.train_step(student, detection_loss(bench, student)),
           "teacher forward": teacher_forward(bench)}
    distiller = bench.distiller(student)

    def kd_step(distiller: Distiller, isolation: str, forward: Optional[Callable[..., Any]] = None) -> Step:
        call = distiller if forward is None else forward
        step = bench.train_step(distiller.student, kd_loss(bench, call))

        def run() -> None:
            distiller.student.group_isolation = distiller.teacher.group_isolation = isolation
            step()
        return run

    for mode in ISOLATION_MODES:
        fns[f"KD step ({mode})"] = kd_step(distiller, mode)
    default = bench.cfg.model.group_isolation
    if bench.compile:
        fns[f"KD step ({default}, torch.compile)"] = kd_step(distiller, default, forward=torch.compile(distiller))
    if bench.channels_last:  # the other memory layout for the backbones (model.channels_last)
        layout = not bench.cfg.model.channels_last
        other_teacher = copy.deepcopy(bench.teacher)
        other_teacher.channels_last = layout
        other = Distiller(bench.student(channels_last=layout), other_teacher,
                          build_criterion(bench.cfg.model, bench.num_classes), bench.cfg.kd)
        fns[f"KD step ({default}, channels_last={layout})"] = kd_step(other.train(), default)
    groups = _sampled_groups(bench, distiller)
    parts = {"part: student step decoding the points too": student_step_with_points(bench, distiller, groups),
             "part: teacher forward over the points": teacher_points_forward(bench, distiller, groups)}
    t = bench.times(fns | parts)
    base = t["student step"] + t["teacher forward"]
    rows = [(name, seconds, seconds / base) for name, seconds in t.items()]
    kd_default = t[f"KD step ({default})"]
    return markdown(f"KD overhead: KD step / (student step + teacher forward), {distiller_points(distiller)}",
                    ["step", "s", "ratio"], rows) + \
        f"\n\nKD step ({default}) / the sum of its parts (student step decoding the points + teacher forward " \
        f"over them; what the method cannot avoid): {kd_default / sum(t[k] for k in parts):.3f}"


def _sampled_groups(bench: Bench, distiller: Distiller) -> list[Queries]:
    """One draw of the distiller's point groups for the bench batch (fixed from then on)."""
    student = distiller.student
    with torch.no_grad():
        memory = bench.teacher.encode(bench.images)
        own = student.encode(bench.images) if any(s.needs_student for s in distiller.samplers) else None
        return [sampler(bench.images.batch_size, bench.device, bench.teacher, memory, student, own)
                for sampler in distiller.samplers]


def student_step_with_points(bench: Bench, distiller: Distiller, groups: list[Queries]) -> Step:
    """The student's train step with the distillation groups decoded beside its queries; no KD loss."""
    student = distiller.student
    criterion = build_criterion(bench.cfg.model, bench.num_classes)

    def loss() -> Tensor:
        out = student(bench.images, bench.targets, extra_queries=groups)
        extra = sum(o.logits.float().mean() + o.boxes.float().mean() for o in out.extra)
        return sum(criterion(out, bench.targets).values()) + extra
    return bench.train_step(student, loss)


def teacher_points_forward(bench: Bench, distiller: Distiller, groups: list[Queries]) -> Step:
    """The teacher's encoder and its decoding of the distillation groups (its targets), no grad."""
    def run() -> None:
        with torch.no_grad(), bench.autocast():
            bench.teacher.decode_groups(bench.teacher.encode(bench.images), groups)
    return run


def distiller_points(distiller: Distiller) -> str:
    sizes = {s.name: getattr(s, "num_points", None) for s in distiller.samplers}
    if "specific" in sizes:
        sizes["specific"] = distiller.teacher.num_queries
    return " + ".join(f"{n} {name}" for name, n in sizes.items()) + " points" if sizes else "no points"


def hf_table(bench: Bench) -> str:
    """Every detector with an HF counterpart against HF's class with the same size and weights."""
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        return "### vs HF transformers\n\nskipped: transformers is not installed (`pip install kddetr[interop]`)"
    rows = []
    for arch in [arch for arch, entry in REGISTRY.items() if entry.hf]:
        ours, hf, max_diff = hf_pair(bench, arch, transformers)
        images, pixel_mask = bench.images.tensors, (~bench.images.mask).long()

        def surrogate(logits: Tensor, boxes: Tensor) -> Tensor:  # the same work after the model on both sides
            return logits.float().sigmoid().mean() + boxes.float().mean()

        def ours_infer() -> None:
            with torch.inference_mode(), bench.autocast():
                ours(bench.images)

        def hf_infer() -> None:
            with torch.inference_mode(), bench.autocast():
                hf(pixel_values=images, pixel_mask=pixel_mask)

        def ours_loss() -> Tensor:
            out = ours(bench.images)
            return surrogate(out.logits[-1], out.boxes[-1])

        def hf_loss() -> Tensor:
            out = hf(pixel_values=images, pixel_mask=pixel_mask)
            return surrogate(out.logits, out.pred_boxes)

        ours.train(), hf.train()
        train = bench.times({"ours": bench.train_step(ours, ours_loss), "hf": bench.train_step(hf, hf_loss)})
        for model in (ours.backbone, hf.model.backbone):  # the transformers' share of the train step
            model.requires_grad_(False)
        frozen = bench.times({"ours": bench.train_step(ours, ours_loss), "hf": bench.train_step(hf, hf_loss)})
        ours.eval(), hf.eval()
        infer = bench.times({"ours": ours_infer, "hf": hf_infer})
        name = spec(arch).name
        for what, t in (("train step", train), ("train step, backbone frozen", frozen), ("inference", infer)):
            rows.append((name, what, t["ours"], t["hf"], t["hf"] / t["ours"], max_diff))
    return markdown(f"vs HF transformers {transformers.__version__} (same size and weights; train step = forward + "
                    "backward + AdamW on the final outputs)", ["model", "step", "ours s", "HF s",
                                                               "speed-up (HF / ours)", "max abs output diff"], rows)


def hf_pair(bench: Bench, arch: str, transformers: Any) -> tuple[nn.Module, nn.Module, float]:
    """Our detector (the benchmark's config for its own arch, else the arch's embedded student config) and HF's
    built from the same config and weights (offline)."""
    from kddetr.interop.hf import converter_for, write_hf

    base = bench.cfg.model if arch == bench.cfg.model.arch else load_config(spec(arch).student_config).model
    # the benchmark's number of queries (its images may offer few proposals); HF: no denoising, batch norm frozen
    cfg = base.replace(num_queries=bench.cfg.model.num_queries, group_isolation="separate",
                       denoising=dataclasses.replace(base.denoising, enabled=False),
                       backbone=dataclasses.replace(base.backbone, frozen_bn=True))
    ours = build_detector(cfg, bench.num_classes).to(bench.device).eval()
    names = DatasetInfo(list(range(bench.num_classes)), [f"class_{i}" for i in range(bench.num_classes)])
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(tmp, cfg, {k: v.cpu() for k, v in ours.state_dict().items()}, names)
        hf_class = getattr(transformers, converter_for(arch).architecture)
        hf = hf_class.from_pretrained(tmp).to(bench.device).eval()
    with torch.inference_mode():
        out = ours(bench.images)
        ref = hf(pixel_values=bench.images.tensors, pixel_mask=(~bench.images.mask).long())
    diff = max((out.pred_logits - ref.logits).abs().max().item(), (out.pred_boxes - ref.pred_boxes).abs().max().item())
    return ours, hf, diff


def inference_table(bench: Bench) -> str:
    """Images per second: the distilled student (trained with KD for a few steps) vs the plain one and the teacher."""
    plain, distilled = bench.student(), bench.student()
    distiller = bench.distiller(distilled)
    kd_step = bench.train_step(distilled, kd_loss(bench, distiller))
    for _ in range(2):
        kd_step()
    teacher = teacher_with_queries(bench.teacher_path, 0, bench.num_classes, bench.device)  # not widened
    models = {"plain student": plain.eval(), "distilled student": distilled.eval(), "teacher": teacher}

    def infer(model: nn.Module) -> Step:
        def run() -> None:
            with torch.inference_mode(), bench.autocast():
                model(bench.images)
        return run

    t = bench.times({name: infer(model) for name, model in models.items()})
    batch = bench.images.batch_size
    rows = [(name, batch / t[name], t["plain student"] / t[name]) for name in models]
    return markdown(f"inference: images/s, batch {batch}", ["model", "images/s", "ratio to plain student"], rows)


def loader_table(bench: Bench, data: Path, workers: Sequence[int]) -> str:
    """A KD step fed by the real training DataLoader (train transforms, pinned memory on CUDA, persistent workers)
    against the same step on batches already in memory; wall-clock, since the workers are other processes.

    Every training image is resized to one size here (the eval size, no random crop): with the configs' several
    sizes, the in-memory batches and the fed ones would differ in size, and so would their steps' cost."""
    from kddetr.data.loader import make_loader

    one_size = dataclasses.replace(bench.cfg.data, train_sizes=[bench.cfg.data.eval_size], random_crop=False)
    dataset = build_dataset(data, bench.cfg.data.train_split, one_size, train=True)
    batch = bench.images.batch_size
    student = bench.student()
    distiller = bench.distiller(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=fused_adamw_ok(student))

    def step(images: ImageBatch, targets: list[dict[str, Tensor]]) -> None:
        images = images.to(bench.device, non_blocking=True)
        targets = [{k: v.to(bench.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with bench.autocast():
            loss = sum(distiller(images, targets)[1].values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cycle(loader: Any) -> Iterator[Any]:
        while True:
            yield from loader

    rounds = max(2, bench.repeats)
    memory = list(itertools.islice(cycle(make_loader(dataset, batch, True, 0, device=bench.device)), rounds))
    fns = {"batches in memory": (lambda it=itertools.cycle(memory): step(*next(it)))}
    for n in dict.fromkeys(workers):
        feed = cycle(make_loader(dataset, batch, True, n, device=bench.device))
        fns[f"DataLoader, {n} workers"] = lambda feed=feed: step(*next(feed))
    t = median_times(fns, rounds, warmup=2 if not bench.quick else 0, device=torch.device("cuda")
                     if bench.device.type == "cuda" else torch.device("cpu"), wall_clock=True)
    base = t["batches in memory"]
    rows = [(name, t[name], t[name] / base) for name in fns]
    size = tuple(memory[0][0].tensors.shape[-2:])
    return markdown(f"input pipeline: KD step, batch {batch} from {data} (train images at the eval size, "
                    f"first batch {size} px; wall-clock)",
                    ["fed by", "s/step", "ratio to in-memory"], rows)


def _peak_step(bench: Bench, kind: str) -> Step:
    student = bench.student()
    if kind == "train":
        return bench.train_step(student, detection_loss(bench, student))
    if kind == "KD":
        return kd_train_step(bench, student)
    student.eval()

    def run() -> None:
        with torch.inference_mode(), bench.autocast():
            student(bench.images)
    return run


MEMORY_KINDS = ("train", "KD", "inference")


def memory_probe(args: argparse.Namespace, kind: str) -> tuple[float, float]:
    """(before, peak) MiB of a `kind` step: CPU resident set (peak reset after the setup), CUDA allocated."""
    bench = setup(args)
    step = _peak_step(bench, kind)
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        step()
        torch.cuda.synchronize()
        return base, torch.cuda.max_memory_allocated() / 2**20
    gc.collect()
    base = reset_peak_rss()
    step()
    step()  # the optimiser state appears in the first step; the second shows the steady peak
    return base, peak_rss()


def memory_table(bench: Bench, args: argparse.Namespace) -> str:
    """Each step in a fresh process on CPU (peak RSS never goes down), in this one on CUDA (peak allocated)."""
    fresh = bench.device.type == "cpu" and not bench.quick
    if fresh:
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            results = {k: pool.apply(memory_probe, (args, k)) for k in MEMORY_KINDS}
    else:
        results = {k: memory_probe(args, k) for k in MEMORY_KINDS}
    what = "peak allocated" if bench.device.type == "cuda" else "peak RSS, each in a fresh process" if fresh else \
        "peak RSS"
    rows = [(k, peak, peak - base, peak / results["train"][1]) for k, (base, peak) in results.items()]
    return markdown(f"memory: {what}, MiB, batch {bench.images.batch_size}",
                    ["step", "peak", "peak - before the step", "peak / train peak"], rows)


def scaling_tables(bench: Bench) -> str:
    """KD step time vs the number of general points, and KD overhead vs image size."""
    counts = (0, 4, 8) if bench.quick else (0, 100, 300, 900)
    student = bench.student()
    fns = {}
    for n in counts:
        distiller = bench.distiller(student, general_points=n, specific_points=False)
        fns[n] = bench.train_step(student, kd_loss(bench, distiller))
    t = bench.times({str(n): fn for n, fn in fns.items()})
    det = bench.cfg.model.num_queries
    rows = [(n, t[str(n)], t[str(n)] / t["0"], (det + n) / det,
             (t[str(n)] - t["0"]) / n * 100 if n else "–") for n in counts]
    by_points = markdown(f"scaling: KD step vs general points (no specific), isolation "
                         f"{bench.cfg.model.group_isolation}, {det} detection queries",
                         ["points", "KD step s", "ratio to 0 points", "student decoder queries ratio",
                          "s per 100 points"], rows)
    sizes = (64, 96) if bench.quick else (96, 128, 192, 256)
    rows = []
    original = bench.images
    for size in sizes:
        bench.images = resized(original, size)
        distiller = bench.distiller(student)
        t = bench.times({"student": bench.train_step(student, detection_loss(bench, student)),
                         "teacher": teacher_forward(bench),
                         "KD": bench.train_step(student, kd_loss(bench, distiller))})
        rows.append((size, t["student"], t["teacher"], t["KD"], t["KD"] / (t["student"] + t["teacher"])))
    bench.images = original
    by_size = markdown(f"scaling: image size, {distiller_points(distiller)}",
                       ["size px", "student step s", "teacher forward s", "KD step s", "KD overhead"], rows)
    return by_points + "\n\n" + by_size


def thread_counts() -> list[int]:
    """1, the powers of two below this process's CPU thread count, and that count."""
    most = torch.get_num_threads()
    return sorted({1, most} | {n for n in (2, 4, 8, 16, 32) if n < most})


def on_threads(step: Step, threads: int) -> Step:
    def run() -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            step()
        finally:
            torch.set_num_threads(before)
    return run


def kd_train_step(bench: Bench, student: nn.Module) -> Step:
    return bench.train_step(student, kd_loss(bench, bench.distiller(student)))


def _three_steps(bench: Bench) -> dict[str, Step]:
    student = bench.student()
    return {"student step": bench.train_step(student, detection_loss(bench, student)),
            "teacher forward": teacher_forward(bench), "KD step": kd_train_step(bench, student)}


def threads_table(bench: Bench) -> str:
    """Wall-clock seconds of each step on 1 … N CPU threads (N: this process's), interleaved, and the speed-up."""
    if bench.device.type != "cpu":
        return "### threads: CPU only"
    counts = thread_counts()
    steps = _three_steps(bench)
    t = median_times({f"{name} @{n}": on_threads(step, n) for name, step in steps.items() for n in counts},
                     bench.repeats, bench.warmup, bench.device, wall_clock=True)
    rows = [(name, *(t[f"{name} @{n}"] for n in counts), t[f"{name} @1"] / t[f"{name} @{counts[-1]}"])
            for name in steps]
    return markdown(f"threads: wall-clock s per step on {', '.join(map(str, counts))} CPU threads",
                    ["step", *(f"{n} thread{'s' * (n > 1)}" for n in counts), f"speed-up 1 → {counts[-1]}"], rows)


def ops_table(bench: Bench, top: int = 8) -> str:
    """The ops taking most of a KD step's CPU time (torch.profiler, self time) on 1 and on N threads."""
    if bench.device.type != "cpu":
        return "### ops: CPU only"
    from torch.profiler import ProfilerActivity, profile

    counts = sorted({1, torch.get_num_threads()})
    kd_step = kd_train_step(bench, bench.student())
    rounds = max(1, bench.repeats)
    per_op: dict[int, dict[str, float]] = {}
    for n in counts:
        step = on_threads(kd_step, n)
        for _ in range(bench.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                step()
        per_op[n] = {e.key: e.self_cpu_time_total / 1e3 / rounds for e in prof.key_averages()}
    one, most = per_op[1], per_op[counts[-1]]
    total, total_most = sum(one.values()), sum(most.values())
    names = sorted(one, key=one.get, reverse=True)[:top]
    rows = [(name, one[name] / total, one[name], most.get(name, 0.0), one[name] / max(most.get(name, 0.0), 1e-9))
            for name in names]
    rows.append(("all ops", 1.0, total, total_most, total / total_most))
    return markdown(f"ops: a KD step's CPU self time by op (torch.profiler, mean of {rounds} steps), the top {top} "
                    f"on 1 thread", ["op", "share on 1 thread", "ms on 1 thread", f"ms on {counts[-1]} threads",
                                     f"speed-up 1 → {counts[-1]}"], rows)


def resized(images: ImageBatch, size: int) -> ImageBatch:
    tensors = F.interpolate(images.tensors, size=(size, size), mode="bilinear", align_corners=False)
    return ImageBatch(tensors, torch.zeros(tensors.shape[0], size, size, dtype=torch.bool, device=tensors.device))


# ---- setup -----------------------------------------------------------------------------------------------
def teacher_with_queries(path: Path, num_queries: int, num_classes: int, device: torch.device) -> nn.Module:
    """The teacher: a checkpoint, or a YAML config built with random weights (speed does not depend on them).

    With `num_queries` other than its own (0: its own), the same weights and more (random) queries: the speed
    of a 300-query teacher does not depend on what its extra anchors learned.
    """
    if path.suffix in (".yaml", ".yml"):
        cfg, state = load_config(path, ["model.backbone.weights=null"]).model, {}
    else:
        ckpt = load_checkpoint(path)
        if ckpt.dataset.num_classes != num_classes:
            raise UserError(f"{path}: teacher has {ckpt.dataset.num_classes} classes, the data {num_classes}")
        cfg, state = ckpt.config.model, ckpt.model.state_dict()
        if num_queries in (0, cfg.num_queries):
            return ckpt.model.to(device).eval()
    torch.manual_seed(0)
    model = build_detector(dataclasses.replace(cfg, num_queries=num_queries or cfg.num_queries), num_classes)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if v.shape == own[k].shape}, strict=False)
    return model.to(device).eval()


def setup(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    amp = None
    if args.amp:
        amp = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    overrides = [f"kd.general_points={args.general_points}", *args.overrides]
    cfg = load_config(args.config, overrides)
    dataset = build_dataset(args.data, cfg.data.train_split, cfg.data, train=False)
    if len(dataset) < args.batch_size:
        raise UserError(f"{args.data}: {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    images, targets = collate([dataset[i] for i in range(args.batch_size)])
    if args.image_size:
        images = resized(images, args.image_size)
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    teacher = teacher_with_queries(args.teacher, args.specific_points, dataset.num_classes, device)
    quick = args.quick
    return Bench(cfg, device, amp, images, targets, dataset.num_classes, teacher, args.teacher,
                 repeats=args.repeats if args.repeats is not None else (1 if quick else 10),
                 warmup=0 if quick else 2, quick=quick, compile=args.compile, channels_last=args.channels_last)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kddetr bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/embedded_student.yaml"))
    p.add_argument("--teacher", type=Path, default=Path("assets/teacher"),
                   help="teacher checkpoint, or a YAML config to time a randomly initialised teacher of that size")
    p.add_argument("--data", type=Path, default=Path("data/embedded"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 + grad scaling on GPUs without bf16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the batch to this square size (default: the data's eval size)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per table (default 10, --quick 1)")
    p.add_argument("--general-points", type=int, default=300)
    p.add_argument("--specific-points", type=int, default=300,
                   help="teacher queries (its learned ones, more at random if it has fewer); 0: the teacher's own")
    p.add_argument("--only", choices=TABLES, action="append", help="tables to print (repeatable; default all)")
    p.add_argument("--loader-workers", type=int, nargs="*", default=[1, 2],
                   help="worker counts timed by the loader table besides the config's data.num_workers")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd KD step")
    p.add_argument("--channels-last", action="store_true", help="also time a KD step with model.channels_last flipped")
    p.add_argument("--quick", action="store_true", help="one round, small point counts and sizes (for tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--records", type=Path, help="also save the command and its printed tables here (output.json), "
                                                 "for `kddetr bench report`")
    return p


def run(args: argparse.Namespace) -> Iterator[str]:
    bench = setup(args)
    threads = torch.get_num_threads() if bench.device.type == "cpu" else torch.cuda.get_device_name(bench.device)
    clock = "process CPU time" if cpu_clock(bench.device) else "wall-clock time"
    yield (f"device {bench.device} ({threads} threads)" if bench.device.type == "cpu" else f"device {threads}") + \
        f", amp {bench.amp}, batch {bench.images.batch_size} at {tuple(bench.images.tensors.shape[-2:])} px, " \
        f"median {clock} of {bench.repeats} interleaved rounds"
    tables = {"kd": kd_table, "hf": hf_table, "inference": inference_table,
              "memory": lambda b: memory_table(b, args), "scaling": scaling_tables,
              "loader": lambda b: loader_table(b, args.data, [b.cfg.data.num_workers, *args.loader_workers]),
              "threads": threads_table, "ops": ops_table}
    for name in args.only or TABLES:
        yield tables[name](bench)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    printed = []
    for text in run(args):
        print(text + "\n", flush=True)
        printed.append(text)
    if args.records:
        from kddetr.bench.records import save_output

        argv = list(argv if argv is not None else sys.argv[1:])
        save_output(args.records, "kddetr bench speed " + shlex.join(argv), "\n\n".join(printed))
    return 0
