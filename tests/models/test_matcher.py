"""Hungarian matcher: optimality against brute force, the cost formula, empty and mixed-size batches."""
import itertools
import math

import pytest
import torch

from kddetr.models.matcher import HungarianMatcher, assign


def random_targets(n: int, num_classes: int, gen: torch.Generator) -> dict:
    centres = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    sizes = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return {"labels": torch.randint(num_classes, (n,), generator=gen), "boxes": torch.cat([centres, sizes], 1)}


def random_predictions(B: int, Q: int, C: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(B, Q, C, generator=gen) * 2
    centres = torch.rand(B, Q, 2, generator=gen) * 0.8 + 0.1
    boxes = torch.cat([centres, torch.rand(B, Q, 2, generator=gen) * 0.4 + 0.02], -1)
    return logits, boxes


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    matcher = HungarianMatcher()
    for Q in range(1, 7):
        for n in range(0, min(Q, 4) + 1):
            logits, boxes = random_predictions(1, Q, 3, gen)
            targets = [random_targets(n, 3, gen)]
            cost = matcher.cost(logits, boxes, targets)[0]
            (q, t), = matcher(logits, boxes, targets)
            assert len(q) == n and sorted(t.tolist()) == list(range(n)) and len(set(q.tolist())) == n
            best = min((sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(Q), n)))
            assert cost[q, t].sum().item() == pytest.approx(best, abs=1e-5)


def test_cost_formula_by_hand():
    alpha, gamma = 0.3, 1.5
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=3.0, focal_alpha=alpha, focal_gamma=gamma)
    logits = torch.tensor([[[0.7, -1.2]]])
    box = [0.4, 0.5, 0.2, 0.4]
    tgt = [0.5, 0.45, 0.3, 0.2]
    cost = matcher.cost(logits, torch.tensor([[box]]), [{"labels": torch.tensor([1]), "boxes": torch.tensor([tgt])}])
    p = 1 / (1 + math.exp(1.2))
    cls = alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p ** gamma * -math.log(1 - p)
    l1 = sum(abs(a - b) for a, b in zip(box, tgt))
    # box: x 0.3..0.5, y 0.3..0.7; target: x 0.35..0.65, y 0.35..0.55
    inter, union, hull = 0.15 * 0.2, 0.08 + 0.06 - 0.15 * 0.2, 0.35 * 0.4
    giou = inter / union - (hull - union) / hull
    assert cost.item() == pytest.approx(2 * cls + 5 * l1 - 3 * giou, rel=1e-5)


def test_zero_targets_and_mixed_batch():
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    logits, boxes = random_predictions(4, 5, 3, gen)
    targets = [random_targets(n, 3, gen) for n in (0, 3, 1, 7)]
    indices = matcher(logits, boxes, targets)
    assert [len(q) for q, _ in indices] == [0, 3, 1, 5]  # 7 targets, 5 queries: 5 matched
    for b, (q, t) in enumerate(indices):
        assert q.dtype == t.dtype == torch.int64
        alone = matcher(logits[b:b + 1], boxes[b:b + 1], targets[b:b + 1])[0]
        assert torch.equal(q, alone[0]) and torch.equal(t, alone[1])
    empty = matcher(logits, boxes, [random_targets(0, 3, gen) for _ in range(4)])
    assert all(len(q) == len(t) == 0 for q, t in empty)


def test_recovers_teacher_permutation():
    """Hungarian KD use: targets built from another model's outputs (argmax labels and boxes)."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij"), -1).reshape(-1, 2)
    boxes = torch.cat([(grid + 0.5) / 3, torch.full((9, 2), 0.2)], -1)[None]
    logits = torch.randn(1, 9, 4, generator=gen)
    perm = torch.randperm(9, generator=gen)
    teacher = [{"labels": logits[0, perm].argmax(-1), "boxes": boxes[0, perm]}]
    (q, t), = HungarianMatcher()(logits, boxes, teacher)
    assert torch.equal(perm[t], q)


def test_assign_splits_concatenated_targets():
    cost = torch.tensor([[[5.0, 1.0, 0.0], [1.0, 5.0, 9.0]]]).repeat(2, 1, 1)  # image 0: 2 targets, image 1: 1
    (q0, t0), (q1, t1) = assign(cost, [2, 1])
    assert q0.tolist() == [0, 1] and t0.tolist() == [1, 0]
    assert q1.tolist() == [0] and t1.tolist() == [0]
