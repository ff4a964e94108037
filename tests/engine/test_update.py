"""The update of a step: one clipped AdamW step on the summed losses, or detection and KD each on its own."""
import copy

import pytest
import torch
from torch import nn

from kddetr.config import TrainConfig
from kddetr.engine.objective import is_distillation_loss
from kddetr.engine.update import Update


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.box_only = nn.Linear(3, 1)  # reached by the detection loss only

    def lr_multipliers(self) -> dict[str, float]:
        return {}

    def forward(self, x: torch.Tensor, kd_scale: float = 1.0, with_kd: bool = True) -> dict[str, torch.Tensor]:
        feats = self.backbone(x).tanh()
        out = {"loss_ce": self.head(feats).pow(2).mean(), "loss_bbox": self.box_only(feats).abs().mean()}
        if with_kd:
            out["general/kd_cls"] = kd_scale * (self.head(feats) - 1.0).pow(2).mean()
        return out


def _update(model: nn.Module, kd_update: str = "joint", weight_decay: float = 0.1) -> Update:
    train = TrainConfig(lr=1e-2, lr_backbone=5e-3, weight_decay=weight_decay, clip_max_norm=0.1, kd_update=kd_update)
    return Update(model, train, steps_per_epoch=10, scaler=torch.amp.GradScaler("cpu", enabled=False))


def _step(model: Toy, update: Update, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    losses = model(x, **kw)
    update.step(losses, sum(losses.values()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _twin(model: Toy) -> Toy:
    twin = Toy()
    twin.load_state_dict(model.state_dict())
    return twin


X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def test_joint_update_is_one_clipped_adamw_step_on_the_summed_losses():
    model = Toy()
    twin = _twin(model)
    update = _update(model)
    reference = torch.optim.AdamW([{"params": twin.backbone.parameters(), "lr": 5e-3},
                                   {"params": [*twin.head.parameters(), *twin.box_only.parameters()], "lr": 1e-2}],
                                  weight_decay=0.1, foreach=True)
    for _ in range(3):
        _step(model, update, X)
        reference.zero_grad()
        sum(twin(X).values()).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
        reference.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_separate_update_gives_the_detection_optimiser_the_alone_students_step():
    """The detection AdamW takes the step of the student alone; the KD update (its own clip and moments, no weight
    decay) is added to it, and the KD loss's scale does not change the step."""
    start = Toy()
    alone, kd_only, separate, louder = (_twin(start) for _ in range(4))
    alone_update = _update(alone)
    after_alone = _step(alone, alone_update, X, with_kd=False)
    kd_reference = _update(kd_only, weight_decay=0.0)
    kd_losses = {k: v for k, v in kd_only(X).items() if is_distillation_loss(k)}
    kd_reference.step(kd_losses, sum(kd_losses.values()))
    after_kd = kd_only.state_dict()
    updates = {"separate": _update(separate, "separate"), "louder": _update(louder, "separate")}
    after = {"separate": _step(separate, updates["separate"], X),
             "louder": _step(louder, updates["louder"], X, kd_scale=1000.0)}
    before = start.state_dict()
    for name in before:
        expected = after_alone[name] + (after_kd[name] - before[name])
        torch.testing.assert_close(after["separate"][name], expected, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(after["louder"][name], expected, atol=1e-5, rtol=1e-4, msg=name)
    for mine, theirs in zip(updates["louder"].optimizer.state.values(), alone_update.optimizer.state.values()):
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"])
    box_only = dict(separate.named_parameters())["box_only.weight"]  # reached by the detection loss only
    assert box_only not in updates["separate"].kd_optimizer.state


def test_joint_update_lets_a_large_kd_gradient_choose_the_shared_parts_step():
    """What `separate` is for: Adam normalises each coordinate of the summed gradient, so where the KD gradient is
    the larger the shared parts (here the backbone) step the way the KD goes, whatever the labels say."""
    start = Toy()
    alone, loud, kd_only = _twin(start), _twin(start), _twin(start)
    before = start.state_dict()["backbone.weight"]
    moved = {}
    for name, model, kw in (("alone", alone, {"with_kd": False}), ("loud", loud, {"kd_scale": 1000.0})):
        moved[name] = _step(model, _update(model), X, **kw)["backbone.weight"] - before
    kd_losses = {k: v for k, v in kd_only(X).items() if is_distillation_loss(k)}
    _update(kd_only).step(kd_losses, sum(kd_losses.values()))
    moved["kd"] = kd_only.state_dict()["backbone.weight"] - before
    assert not torch.equal(moved["alone"].sign(), moved["kd"].sign())  # the two losses disagree somewhere
    assert torch.equal(moved["loud"].sign(), moved["kd"].sign())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the schedules keep step
def test_a_step_without_kd_losses_leaves_the_kd_optimiser_untouched():
    model = Toy()
    update = _update(model, "separate")
    _step(model, update, X, with_kd=False)
    assert not update.kd_optimizer.state and update.optimizer.state
    _step(model, update, X)
    steps = {float(s["step"]) for s in update.kd_optimizer.state.values()}
    assert steps == {1.0}
    assert [s.last_epoch for s in update.schedulers] == [2, 2]


def test_state_round_trip_and_the_other_mode_is_refused():
    model = Toy()
    update = _update(model, "separate")
    _step(model, update, X)
    state = copy.deepcopy(update.state_dict())  # as saved: the optimisers' state_dict holds their live tensors
    assert {"optimizer", "scheduler", "scaler", "kd_optimizer", "kd_scheduler"} <= set(state)
    twin = _twin(model)
    restored = _update(twin, "separate")
    restored.load_state_dict(state)
    a, b = _step(model, update, X), _step(twin, restored, X)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="kd_update"):
        _update(Toy()).load_state_dict(state)
    with pytest.raises(KeyError, match="kd_update"):
        _update(Toy(), "separate").load_state_dict(_update(Toy()).state_dict())


def _two_process_worker(rank: int, store: str, result: str) -> None:
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = Toy()
    wrapped, update = DistributedDataParallel(model), _update(model, "separate")
    for _ in range(3):
        losses = wrapped(X[4 * rank:4 * rank + 4], kd_scale=3.0)
        update.step(losses, sum(losses.values()))
    torch.save(model.state_dict(), f"{result}.{rank}")
    tdist.destroy_process_group()


def test_separate_update_with_two_processes_is_the_update_of_their_whole_batch(tmp_path):
    """Under DDP the KD gradient (taken outside DDP's backward) is averaged by hand: two processes with half the
    batch each take the steps of one process with all of it, and stay identical."""
    torch.multiprocessing.spawn(_two_process_worker, args=(str(tmp_path / "store"), str(tmp_path / "w")), nprocs=2)
    ranks = [torch.load(tmp_path / f"w.{r}", weights_only=True) for r in (0, 1)]
    model = Toy()
    update = _update(model, "separate")
    for _ in range(3):
        whole = _step(model, update, X, kd_scale=3.0)
    for name in whole:
        torch.testing.assert_close(ranks[0][name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(ranks[0][name], ranks[1][name]), name
