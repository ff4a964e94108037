"""The Python API: `kddetr.load(...).predict(...)` and the README's own-training-loop snippet, run as written."""
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import kddetr
from kddetr.data.synth import generate

REPO = Path(__file__).parents[1]


def test_import_is_light_and_names_load_on_use():
    assert kddetr.__version__ and "load" in dir(kddetr)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kddetr.nope  # noqa: B018


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    generate(root / "data" / "embedded", num_train=16, num_val=2, size=128, seed=0, num_test=4)
    return root


def test_predict_finds_the_digits_of_a_test_image_in_its_pixels(tiny_data):
    model = kddetr.load(REPO / "assets" / "teacher")
    image = tiny_data / "data" / "embedded" / "images" / "test" / "000000.jpg"
    as_path, = model.predict(image, score_threshold=0.3)
    pil = Image.open(image).convert("RGB")
    from_pil, from_tensor = model.predict([pil, torch.from_numpy(__import__("numpy").array(pil)).permute(2, 0, 1)],
                                          score_threshold=0.3)
    assert len(as_path) > 0 and as_path.names == from_pil.names == from_tensor.names
    for other in (from_pil, from_tensor):  # alone or in a batch of two, from a file, a PIL image or a tensor
        assert torch.allclose(as_path.boxes, other.boxes, atol=1e-3)
    assert as_path.names == [model.category_names[model.dataset.category_ids.index(c)]
                             for c in as_path.category_ids.tolist()]
    assert (as_path.scores[:-1] >= as_path.scores[1:]).all() and (as_path.boxes >= 0).all()
    assert (as_path.boxes[:, 2:] <= 128).all()
    everything, = model.predict(image)
    assert len(everything) == 300  # the DAB-DETR default num_select: every (query, class) pair of 30 x 10


def test_the_readme_training_loop_runs_as_written(tiny_data, monkeypatch):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"<!-- snippet:training-loop -->\n```python\n(.*?)```", text, re.S).group(1)
    for name in ("configs", "assets"):
        (tiny_data / name).symlink_to(REPO / name) if not (tiny_data / name).exists() else None
    monkeypatch.chdir(tiny_data)
    scope: dict = {}
    exec(compile(snippet, "README.md:training-loop", "exec"), scope)  # noqa: S102 - our own README
    losses = scope["losses"]
    assert any(k.startswith("general/kd_cls") for k in losses) and any(k.startswith("specific/kd_") for k in losses)
    assert any(k.startswith("loss_") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert scope["student"].class_embed.weight.grad is not None
