from pathlib import Path

import pytest

from kddetr.config import Config, load_config, save_config, apply_overrides
from kddetr.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_follow_the_paper():
    cfg = Config()
    assert (cfg.kd.cls_weight, cfg.kd.bbox_weight, cfg.kd.giou_weight) == (1.0, 5.0, 2.0)
    assert cfg.kd.temperature == 10.0 and cfg.kd.general_points == 300
    assert (cfg.model.loss.cls_weight, cfg.model.loss.bbox_weight, cfg.model.loss.giou_weight) == (1.0, 5.0, 2.0)


@pytest.mark.parametrize("arch,expected", [("dab_detr", 300), ("dino", 300), ("deformable_detr", 100),
                                           ("faster_rcnn", 100)])
def test_detections_scored_per_image_follow_each_reference_unless_set(arch, expected):
    from kddetr.models.build import num_select

    assert num_select(load_config(None, [f"model.arch={arch}"]).model) == expected
    assert num_select(load_config(None, [f"model.arch={arch}", "model.num_select=50"]).model) == 50


def test_unknown_key_names_file_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hiden_dim: 64\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "hiden_dim" in msg and "Did you mean 'hidden_dim'" in msg and "num_queries" in msg


@pytest.mark.parametrize("override,fragment", [
    ("model.hidden_dim=abc", "expected an integer"),
    ("train.lr=fast", "expected a number"),
    ("model.activation=tanh", "not one of"),
    ("kd.general_distribution=gaussian", "not one of"),
    ("model.hidden_dim=30", "divisible by num_heads"),
    ("train.batch_size=0", "must be > 0"),
    ("model.backbone=resnet18", "expected a mapping"),
    ("nope.x=1", "unknown key 'nope'"),
    ("train.amp=maybe", "true/false"),
    ("train.lr", "expected key=value"),
    ("model.num_select=-1", "num_select: must be >= 0"),
])
def test_bad_values_raise_one_clear_error(override, fragment):
    with pytest.raises(UserError, match=fragment):
        load_config(None, [override])


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, ["model.hidden_dim=64", "model.backbone.name=resnet18", "train.lr_drop_epochs=[3, 5]",
                             "kd.method=hungarian", "model.backbone.weights=null"])
    assert cfg.model.hidden_dim == 64 and cfg.model.backbone.name == "resnet18"
    assert cfg.train.lr_drop_epochs == [3, 5] and cfg.kd.method == "hungarian"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_scalar_for_list_is_wrapped():
    assert apply_overrides({}, ["train.lr_drop_epochs=4"]) == {"train": {"lr_drop_epochs": 4}}
    assert load_config(None, ["train.lr_drop_epochs=4"]).train.lr_drop_epochs == [4]
