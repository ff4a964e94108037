"""collate: bottom/right zero padding, mask False exactly on the image area, size divisibility."""
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from kddetr.config import DataConfig
from kddetr.data.coco import build_dataset
from kddetr.data.collate import collate
from kddetr.models.protocol import ImageBatch


def batch_of(*shapes):
    return [(torch.rand(3, h, w) + 1, {"image_id": torch.tensor(i)}) for i, (h, w) in enumerate(shapes)]


@pytest.mark.parametrize("divisibility, expected", [(1, (8, 7)), (4, (8, 8)), (32, (32, 32))])
def test_padding_and_mask(divisibility, expected):
    batch = batch_of((5, 7), (8, 4), (3, 3))
    images, targets = collate(batch, size_divisibility=divisibility)
    assert isinstance(images, ImageBatch)
    assert images.tensors.shape == (3, 3, *expected) and images.mask.shape == (3, *expected)
    assert [t["image_id"].item() for t in targets] == [0, 1, 2]
    for i, (image, _) in enumerate(batch):
        h, w = image.shape[-2:]
        inside = torch.zeros(expected, dtype=torch.bool)
        inside[:h, :w] = True
        assert torch.equal(images.mask[i], ~inside)
        assert torch.equal(images.tensors[i, :, :h, :w], image)
        assert (images.tensors[i][:, ~inside] == 0).all()


def test_single_image_has_no_padding():
    images, _ = collate(batch_of((6, 9)))
    assert images.tensors.shape == (1, 3, 6, 9) and not images.mask.any()


def test_with_dataset_and_loader(coco_dict, make_coco):
    cfg = DataConfig(train_sizes=[64, 80], eval_size=64, max_size=160)
    dataset = build_dataset(make_coco(coco_dict), "val", cfg, train=False)
    loader = DataLoader(dataset, batch_size=3, collate_fn=partial(collate, size_divisibility=16))
    images, targets = next(iter(loader))
    assert images.tensors.shape == (3, 3, 96, 96)  # 64x85, 85x64, 64x64 padded to multiples of 16
    for mask, target in zip(images.mask, targets):
        h, w = target["size"].tolist()
        assert (~mask).sum() == h * w and not mask[:h, :w].any()
