"""Transforms: boxes stay inside the image and on their pixels, flip, eval sizes, crop bounds."""
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors

from kddetr.config import DataConfig
from kddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, build_transforms
from kddetr.errors import UserError

SMALL = DataConfig(train_sizes=[112, 128, 144], eval_size=128, max_size=240)


def sample(seed: int, width: int = 128, height: int = 128, n: int = 4):
    """A black image with `n` random non-overlapping white boxes laid on a grid, and its dataset target."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width // 2, height // 2
    boxes = []
    for i in range(n):
        x0, y0 = (i % 2) * cell_w, (i // 2) * cell_h
        w, h = int(torch.randint(4, cell_w, (), generator=g)), int(torch.randint(4, cell_h, (), generator=g))
        x = x0 + int(torch.randint(0, cell_w - w + 1, (), generator=g))
        y = y0 + int(torch.randint(0, cell_h - h + 1, (), generator=g))
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 255, 255))
        boxes.append([x, y, x + w, y + h])
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                          canvas_size=(height, width)),
        "labels": torch.arange(n),
        "image_id": torch.tensor(seed),
        "orig_size": torch.tensor([height, width]),
    }
    return image, target


def brightness(image: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation; mean over channels, in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).mean(0)


@pytest.mark.parametrize("random_crop", [True, False])
def test_train_boxes_stay_inside_and_on_their_pixels(random_crop):
    cfg = DataConfig(train_sizes=SMALL.train_sizes, max_size=SMALL.max_size, random_crop=random_crop)
    transforms = build_transforms(cfg, train=True)
    shapes = set()
    for seed in range(150):
        torch.manual_seed(seed)
        image, target = transforms(*sample(seed, width=128 + seed % 64))
        _, h, w = image.shape
        shapes.add((h, w))
        assert target["size"].tolist() == [h, w]
        assert min(h, w) >= min(cfg.train_sizes) - 1 and max(h, w) <= cfg.max_size
        boxes = target["boxes"]
        assert boxes.shape == (len(target["labels"]), 4) and target["labels"].dtype == torch.int64
        cx, cy, bw, bh = boxes.unbind(-1)
        assert (bw > 0).all() and (bh > 0).all()
        eps = 1e-5
        assert (cx - bw / 2 >= -eps).all() and (cx + bw / 2 <= 1 + eps).all()
        assert (cy - bh / 2 >= -eps).all() and (cy + bh / 2 <= 1 + eps).all()
        # every box still covers white pixels: the image and the boxes went through the same geometry
        light = brightness(image)
        for (x, y, bw_px, bh_px) in (boxes * torch.tensor([w, h, w, h])).tolist():
            if bw_px >= 6 and bh_px >= 6:
                assert light[int(y), int(x)] > 0.8
        if not random_crop:
            assert len(boxes) == 4
    assert len(shapes) > 5


def test_random_crop_drops_boxes_it_cuts_away():
    transforms = build_transforms(SMALL, train=True)
    counts = set()
    for seed in range(100):
        torch.manual_seed(seed)
        counts.add(len(transforms(*sample(seed))[1]["boxes"]))
    assert min(counts) < 4 and 4 in counts


def test_hflip_moves_boxes_with_pixels():
    cfg = DataConfig(train_sizes=[128], max_size=300, random_crop=False, hflip=True)
    transforms = build_transforms(cfg, train=True)
    image, target = sample(0, width=160)
    reference, ref_target = build_transforms(DataConfig(train_sizes=[128], eval_size=128, max_size=300), train=False)(
        image, {**target})
    flipped_seen = unflipped_seen = False
    for seed in range(20):
        torch.manual_seed(seed)
        out, out_target = transforms(image, {**target})
        if torch.equal(out, reference):
            unflipped_seen = True
            torch.testing.assert_close(out_target["boxes"], ref_target["boxes"])
        else:
            flipped_seen = True
            torch.testing.assert_close(out, reference.flip(-1))
            expected = ref_target["boxes"].clone()
            expected[:, 0] = 1 - expected[:, 0]
            torch.testing.assert_close(out_target["boxes"], expected)
    assert flipped_seen and unflipped_seen


@pytest.mark.parametrize("width, height, expected", [
    (160, 120, (128, 170)),  # shorter side to eval_size
    (96, 128, (170, 128)),
    (128, 128, (128, 128)),
    (300, 100, (80, 240)),  # longer side capped at max_size: 240 * 100 / 300
])
def test_eval_resize(width, height, expected):
    transforms = build_transforms(SMALL, train=False)
    image, target = sample(1, width, height)
    normalised = target["boxes"] / torch.tensor([width, height, width, height])
    out, out_target = transforms(image, target)
    assert tuple(out.shape) == (3, *expected) and tuple(out_target["size"].tolist()) == expected
    assert out_target["orig_size"].tolist() == [height, width]
    x0, y0, x1, y1 = normalised.unbind(-1)
    torch.testing.assert_close(out_target["boxes"], torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1))


def test_eval_is_deterministic_and_normalised():
    transforms = build_transforms(SMALL, train=False)
    a, _ = transforms(*sample(3))
    b, _ = transforms(*sample(3))
    assert torch.equal(a, b)
    light = brightness(a)
    assert light.min() >= -1e-5 and light.max() <= 1 + 1e-5 and light.max() > 0.9


def test_random_size_crop_bounds():
    crop = RandomSizeCrop(40, 60)
    image = tv_tensors.Image(torch.zeros(3, 100, 50))
    for seed in range(50):
        torch.manual_seed(seed)
        h, w = crop(image).shape[-2:]
        assert 40 <= h <= 60 and 40 <= w <= 50
    assert crop(tv_tensors.Image(torch.zeros(3, 20, 30))).shape[-2:] == (20, 30)  # smaller than min_size: kept


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="data.max_size"):
        build_transforms(DataConfig(eval_size=640, max_size=640), train=False)
    with pytest.raises(UserError, match="data.train_sizes"):
        build_transforms(DataConfig(train_sizes=[]), train=True)
