"""Non-finite losses found without a host sync per step: the device-side record and the stop it triggers."""
from pathlib import Path

import pytest
import torch

from kddetr.config import load_config
from kddetr.data.synth import generate
from kddetr.engine.runner import run_training
from kddetr.engine.nonfinite import NonFiniteLossError, NonFiniteWatch

TINY = Path(__file__).parent.parent / "fixtures" / "tiny.yaml"


def test_watch_keeps_the_first_bad_step_and_its_terms() -> None:
    watch = NonFiniteWatch()
    nan = torch.tensor(float("nan"))
    assert watch.first(torch.device("cpu")) is None
    for step, giou in [(0, 1.0), (1, 2.0), (2, nan), (3, 1.0)]:
        losses = {"loss_ce": torch.tensor(0.5), "loss_giou": torch.as_tensor(giou)}
        watch.update(losses, sum(losses.values()), step)
    watch.update({"loss_ce": torch.tensor(float("inf")), "loss_giou": torch.tensor(1.0)}, torch.tensor(1.0), 4)
    assert watch.first(torch.device("cpu")) == (2, ["loss_giou", "total"])


def test_lazy_check_stops_before_writing_a_checkpoint(tmp_path, monkeypatch) -> None:
    from kddetr.models import criterion as crit
    original = crit.SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    generate(tmp_path / "data", num_train=8, num_val=2, size=64, seed=0)
    monkeypatch.setattr(crit.SetCriterion, "forward", poisoned)
    cfg = load_config(TINY, ["train.epochs=1", "train.nonfinite_check_every=5"])  # 2 steps: found at the epoch's end
    with pytest.raises(NonFiniteLossError, match=r"step 0 .*loss_giou"):
        run_training(cfg, tmp_path / "data", tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / "last").exists()
