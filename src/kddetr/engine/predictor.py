"""Inference on images from a checkpoint: a model with its config and categories, and its detections."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import to_pil_image

from kddetr.config import Config
from kddetr.data.coco import open_image
from kddetr.data.collate import collate
from kddetr.data.transforms import build_transforms
from kddetr.engine.checkpoint import DatasetInfo, load_checkpoint
from kddetr.engine.evaluate import postprocess_outputs
from kddetr.models.build import num_select

ImageInput = Union[str, Path, Image.Image, Tensor]


@dataclass
class Detections:
    """One image's detections: `boxes [N, 4]` xyxy in the image's pixels, `scores [N]`, COCO `category_ids [N]`
    and their `names`, best first."""

    boxes: Tensor
    scores: Tensor
    category_ids: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.scores)


class Predictor:
    """A checkpoint ready for inference: the model (eval mode), its config and its categories."""

    def __init__(self, model: nn.Module, config: Config, dataset: DatasetInfo, device: torch.device) -> None:
        self.model, self.config, self.dataset, self.device = model, config, dataset, device
        self.transform = build_transforms(config.data, train=False)

    @property
    def category_names(self) -> list[str]:
        return list(self.dataset.category_names)

    def _prepare(self, image: ImageInput, index: int) -> tuple[Tensor, dict]:
        if isinstance(image, (str, Path)):
            with open_image(Path(image)) as file:
                image = file.convert("RGB")
        elif isinstance(image, Tensor):
            image = to_pil_image(image)
        image = image.convert("RGB")
        h, w = image.height, image.width
        target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(index),
                  "orig_size": torch.tensor([h, w])}
        return self.transform(image, target)

    @torch.inference_mode()
    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], score_threshold: float = 0.0,
                top_k: Optional[int] = None) -> list[Detections]:
        """Detections for each image (a file path, a PIL image or a uint8 `[3, H, W]` tensor), in input order.

        Keeps the `top_k` best (query, class) pairs (default: the architecture's `num_select`) scoring at least
        `score_threshold`.
        """
        single = isinstance(images, (str, Path, Image.Image, Tensor))
        batch, targets = collate([self._prepare(image, i) for i, image in enumerate([images] if single else images)])
        outputs = self.model(batch.to(self.device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(self.device)
        ids = torch.tensor(self.dataset.category_ids)
        results = []
        for pred in postprocess_outputs(outputs, sizes, top_k or num_select(self.config.model)):
            keep = pred["scores"] >= score_threshold
            labels = pred["labels"][keep].cpu()
            results.append(Detections(pred["boxes"][keep].cpu(), pred["scores"][keep].cpu(), ids[labels],
                                      [self.dataset.category_names[i] for i in labels.tolist()]))
        return results


def load(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Predictor:
    """A kddetr checkpoint directory (`model.safetensors` + `config.yaml`; `kddetr import` makes them from HF and
    official checkpoints) as a `Predictor`. `.model` is the detector itself, e.g. a teacher for `Distiller`."""
    device = torch.device(device)
    ckpt = load_checkpoint(checkpoint, device)
    return Predictor(ckpt.model, ckpt.config, ckpt.dataset, device)
