"""The trainer's check that an objective offers `student`, `extra_state` and `load_extra_state`."""
from torch import nn

from kddetr.engine.objective import DetectionObjective, is_objective


class _NoExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(2, 2)


def test_a_student_held_as_a_submodule_is_seen():
    """Python 3.12's runtime protocol check missed `student` (kept in `_modules`, not the instance dict)."""
    objective = DetectionObjective(nn.Linear(2, 2), criterion=lambda *a: {})
    assert "student" not in vars(objective) and is_objective(objective)


def test_an_object_without_the_protocol_is_refused():
    assert not is_objective(_NoExtraState())
    assert not is_objective(object())
