from pathlib import Path

import pytest
import yaml

from kddetr.config import Config, apply_overrides, from_dict, load_config, migrate_saved_config, save_config
from kddetr.errors import UserError

REPO = Path(__file__).parent.parent
CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))


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
    ("model.arch=yolo", "model.arch: 'yolo' is not one of dab_detr, deformable_detr"),
    ("model.dab_detr.num_patterns=x", "config.model.dab_detr.num_patterns: expected an integer"),
    ("model.deformable_detr.two_stage=true", "model.deformable_detr: options of deformable_detr, but "
                                             "config.model.arch is dab_detr"),
    ("model.dab_detr.two_stage=true", "config.model.dab_detr: unknown key 'two_stage'"),
    ("model.two_stage=true", "model.two_stage: an option of deformable_detr"),
    ("kd.cls_iou_target=true", "kd.cls_iou_target: needs cls_loss: bce, got cls_loss: kl"),
    ("kd.fade_steps=-1", "kd.fade_steps: must be >= 0"),
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


def test_each_architecture_reads_its_own_section_and_writes_it_back(tmp_path):
    from kddetr.models.deformable_detr import DeformableOptions

    cfg = load_config(None, ["model.arch=deformable_detr", "model.deformable_detr.two_stage=true",
                             "model.deformable_detr.box_refine=true", "model.num_feature_levels=2"])
    assert cfg.model.options == DeformableOptions(box_refine=True, two_stage=True)
    save_config(cfg, tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]
    assert saved["deformable_detr"]["two_stage"] is True and "options" not in saved and "two_stage" not in saved
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.model.replace(arch="dino").options == load_config(None, ["model.arch=dino"]).model.options
    with pytest.raises(UserError, match="config.model.faster_rcnn.roi_batch_size: must be > 0"):
        load_config(None, ["model.arch=faster_rcnn", "model.faster_rcnn.roi_batch_size=0"])


def test_configs_from_before_the_sections_still_load(tmp_path):
    """A checkpoint's config.yaml of an earlier kddetr: every option flat under `model`, removed options too."""
    old = {"model": {"arch": "dino", "hidden_dim": 64, "num_heads": 4, "num_points": 2, "dino_shared_heads": False,
                     "two_stage": True, "box_refine": True, "normalize_before": False, "anchor_sizes": [32, 64, 128,
                     256, 512], "temperature": 20.0, "group_isolation": "mask"},
           "kd": {"teacher_inference_mode": True}}
    cfg = from_dict(Config, migrate_saved_config(old))
    assert (cfg.model.options.num_points, cfg.model.options.shared_heads, cfg.model.options.decoder_norm) == (
        2, False, True)
    assert cfg.model.group_isolation == "batch"
    with pytest.raises(UserError, match="model.num_points: an option of deformable_detr"):
        from_dict(Config, {"model": {"arch": "dab_detr", "num_points": 8}})  # not inert: refused


def test_the_committed_teacher_config_is_flat_and_loads_with_its_options():
    from kddetr.engine.checkpoint import read_checkpoint_config

    flat = yaml.safe_load((REPO / "assets/teacher/config.yaml").read_text())["model"]
    assert "normalize_before" in flat and "dab_detr" not in flat
    cfg, _ = read_checkpoint_config(REPO / "assets/teacher")
    assert cfg.model.options.normalize_before and cfg.model.options.random_refpoints_xy
