"""End-to-end engine behaviour on a tiny model: train, resume, distil, non-finite losses."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kddetr.config import load_config
from kddetr.data.synth import generate
from kddetr.engine.checkpoint import load_checkpoint
from kddetr.engine.runner import run_training
from kddetr.engine.nonfinite import NonFiniteLossError
from kddetr.errors import UserError
from kddetr.models.build import build_detector, count_parameters

TINY = Path(__file__).parent.parent / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=8, num_val=4, size=64, seed=0)
    return root


def _cfg(*overrides):
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_training(_cfg("train.epochs=1", "model.hidden_dim=48"), data_dir, out, progress=False)
    return out / "last"


def _weights(run):
    return load_file(str(run / "last" / "model.safetensors"))


def test_resume_gives_identical_weights(data_dir, tmp_path):
    run_training(_cfg("train.epochs=2"), data_dir, tmp_path / "straight", progress=False)
    run_training(_cfg("train.epochs=1"), data_dir, tmp_path / "split", progress=False)
    run_training(_cfg("train.epochs=2"), data_dir, tmp_path / "split", resume=True, progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"epoch": 2' in lines[1]
    state = torch.load(tmp_path / "split" / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4


def test_run_dir_contents_and_metrics(data_dir, tmp_path):
    metrics = run_training(_cfg("train.epochs=1"), data_dir, tmp_path / "run", progress=False)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "last/model.safetensors", "last/config.yaml",
                 "last/trainer_state.pt", "best/model.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    ckpt = load_checkpoint(run / "best")
    assert ckpt.dataset.category_names[0] == "digit_0" and ckpt.dataset.num_classes == 10


@pytest.mark.parametrize("method", ["kd_detr", "hungarian"])
def test_distillation_trains_student_only(data_dir, teacher, tmp_path, method):
    before = load_file(str(teacher / "model.safetensors"))
    run_training(_cfg("train.epochs=1", f"kd.method={method}"), data_dir, tmp_path / "kd", teacher=teacher,
                 progress=False)
    after = load_file(str(teacher / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    student = load_checkpoint(tmp_path / "kd" / "last").model
    plain = build_detector(_cfg().model, 10)
    assert set(student.state_dict()) == set(plain.state_dict())
    assert count_parameters(student) == count_parameters(plain)
    rows = (tmp_path / "kd" / "metrics.jsonl").read_text()
    prefix = "general/kd_cls" if method == "kd_detr" else "hungarian/kd_cls"
    assert f"train/{prefix}" in rows


def test_separate_kd_update_distils_and_resumes_bit_exactly(data_dir, teacher, tmp_path):
    """train.kd_update=separate: the second AdamW's state is checkpointed, so a resumed run ends where a straight
    one does; a checkpoint of the other mode does not fit."""
    separate = ("train.kd_update=separate", "train.eval_every=0")
    run_training(_cfg("train.epochs=2", *separate), data_dir, tmp_path / "straight", teacher=teacher, progress=False)
    run_training(_cfg("train.epochs=1", *separate), data_dir, tmp_path / "split", teacher=teacher, progress=False)
    run_training(_cfg("train.epochs=2", *separate), data_dir, tmp_path / "split", teacher=teacher, resume=True,
                 progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "split" / "last" / "trainer_state.pt", weights_only=True)
    assert state["kd_optimizer"]["state"] and state["step"] == 4
    with pytest.raises(UserError, match="trainer_state.pt: does not fit this run.*kd_update"):
        run_training(_cfg("train.epochs=3", "train.eval_every=0"), data_dir, tmp_path / "split", teacher=teacher,
                     resume=True, progress=False)


def test_separate_kd_update_takes_the_alone_students_detection_step(data_dir, teacher, tmp_path):
    """One step from the same weights and batch: with train.kd_update=separate the detection AdamW's moments are
    those of the student trained alone (the detection queries never see a point); with joint they are not."""
    one_step = ("train.max_steps=1", "train.eval_every=0", "data.random_crop=false")
    run_training(_cfg(*one_step), data_dir, tmp_path / "alone", progress=False)
    for mode in ("separate", "joint"):
        run_training(_cfg(*one_step, f"train.kd_update={mode}"), data_dir, tmp_path / mode, teacher=teacher,
                     progress=False)
    moments = {run: [s["exp_avg"] for s in torch.load(tmp_path / run / "last" / "trainer_state.pt",
                                                      weights_only=True)["optimizer"]["state"].values()]
               for run in ("alone", "separate", "joint")}
    for alone, separate in zip(moments["alone"], moments["separate"]):
        torch.testing.assert_close(separate, alone, rtol=1e-3, atol=1e-8)
    assert any(not torch.allclose(j, a, rtol=1e-2, atol=1e-6) for j, a in zip(moments["joint"], moments["alone"]))


def test_nonfinite_loss_stops_with_term_and_step(data_dir, tmp_path, monkeypatch):
    from kddetr.models import criterion as crit
    original = crit.SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(crit.SetCriterion, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 0 .*loss_giou"):
        run_training(_cfg("train.epochs=1"), data_dir, tmp_path / "nan", progress=False)
    run_training(_cfg("train.epochs=1", "train.on_nonfinite=skip"), data_dir, tmp_path / "skip", progress=False)
    assert (tmp_path / "skip" / "last" / "model.safetensors").is_file()


@pytest.mark.slow  # inductor compiles for minutes on 2 CPU cores
def test_compiled_distillation_trains_like_eager(data_dir, teacher, tmp_path):
    """train.compile: the same first-epoch losses and close weights as the eager run."""
    common = ("train.epochs=1", "train.max_steps=2", "train.eval_every=0", "kd.general_points=4")
    for name, flag in (("eager", "false"), ("compiled", "true")):
        torch.manual_seed(0)
        run_training(_cfg(*common, f"train.compile={flag}"), data_dir, tmp_path / name, progress=False,
                     teacher=teacher)
    losses = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1])["train/loss"]
              for n in ("eager", "compiled")]
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-4) for k in eager)


def test_optimizer_is_fused_and_steps_like_foreach():
    """The trainer's fused AdamW (faster) takes the same steps as the default multi-tensor one."""
    from kddetr.engine.optim import build_optimizer
    cfg = _cfg()
    torch.manual_seed(0)
    models = [build_detector(cfg.model, 10) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = {k: v.clone() for k, v in models[0].state_dict().items()}
    fused = build_optimizer(models[0], cfg.train)
    assert fused.defaults["fused"] and len(fused.param_groups) == 2  # the backbone's lr group kept
    names = {id(p): n for n, p in models[0].named_parameters()}
    twin = dict(models[1].named_parameters())
    reference = torch.optim.AdamW([{"params": [twin[names[id(p)]] for p in group["params"]], "lr": group["lr"]}
                                   for group in fused.param_groups], weight_decay=cfg.train.weight_decay, foreach=True)
    for _ in range(3):
        for model in models:
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.01 * (i % 7 - 3) + 0.005)
        fused.step(), reference.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
        if a.requires_grad:
            assert not torch.equal(a, start[name]), name


@pytest.mark.parametrize("two_stage", [False, True])
def test_deformable_offsets_and_reference_points_learn_at_a_tenth_of_the_rate(two_stage):
    """As the reference's lr_linear_proj_mult: one group per multiplier, the rest at lr, the backbone at lr_backbone."""
    from kddetr.engine.optim import build_optimizer
    cfg = load_config(None, ["model.arch=deformable_detr", "model.backbone.name=resnet10", "model.hidden_dim=32",
                             "model.num_heads=4", "model.encoder_layers=1", "model.decoder_layers=2",
                             "model.dim_feedforward=64", "model.num_queries=5",
                             f"model.deformable_detr.two_stage={two_stage}",
                             f"model.deformable_detr.box_refine={two_stage}", "train.lr=1e-3", "train.lr_backbone=2e-4"])
    model = build_detector(cfg.model, 3)
    groups = build_optimizer(model, cfg.train).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    members = [[names[id(p)] for p in g["params"]] for g in groups]
    lrs = [g["lr"] for g in groups]
    assert lrs[:2] == [1e-3, 2e-4] and all(lr == pytest.approx(1e-4) for lr in lrs[2:])  # rest, backbone, slow
    assert all(n.startswith("backbone.") for n in members[1])
    slow = [n for m in members[2:] for n in m]
    assert slow and all("sampling_offsets" in n or "reference_points" in n for n in slow)
    assert any("reference_points" in n for n in slow) != two_stage  # two-stage has no reference-point projection
    assert all("sampling_offsets" not in n and "reference_points" not in n for n in members[0])
    assert sum(map(len, members)) == sum(p.requires_grad for p in model.parameters())
