import pytest
import timm
import torch

from dat_ds.models import NormalizedModel, create_model


@pytest.mark.parametrize("name, in_chans, size", [
    ("resnet18", 1, 28), ("resnet18", 3, 32), ("test_resnet", 3, 224), ("test_vit", 1, 28),
    ("test_vit", 3, 224), ("preactresnet18_w16", 3, 32), ("wrn16_4", 1, 28), ("test_convnext", 3, 32),
])
def test_backbones_adapt_to_input(name, in_chans, size):
    model = create_model(name, num_classes=7, in_chans=in_chans, img_size=size)
    out = model.eval()(torch.rand(2, in_chans, size, size))
    assert out.shape == (2, 7)


def test_small_input_stem_keeps_resolution():
    small = create_model("resnet18", 10, 3, 32)
    native = create_model("resnet18", 10, 3, 32, stem="native")
    assert small.backbone.conv1.stride == (1, 1) and isinstance(small.backbone.maxpool, torch.nn.Identity)
    assert native.backbone.conv1.stride == (2, 2)
    big = create_model("resnet18", 10, 3, 224)
    assert big.backbone.conv1.stride == (2, 2)


def test_normalization_is_inside_the_model_and_saved():
    model = create_model("test_resnet", 10, 3, 32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    sd = model.state_dict()
    assert torch.allclose(sd["normalize.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    x = torch.rand(1, 3, 4, 4)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.5, 0.25]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected, atol=1e-6)


def test_single_channel_stats_broadcast_to_rgb():
    model = create_model("test_resnet", 10, 3, 32, mean=(0.5,), std=(0.25,))
    assert model.normalize.mean.shape == (1, 3, 1, 1)


def test_cifar_backbones_are_timm_models():
    import dat_ds.models  # noqa: F401  (registers them)
    for name in ("preactresnet18", "wrn28_10", "wrn34_10", "wrn16_4"):
        assert timm.is_model(name)
    m = timm.create_model("preactresnet18", num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(11.17e6, rel=0.01)
    w = timm.create_model("wrn28_10", num_classes=10)
    assert sum(p.numel() for p in w.parameters()) == pytest.approx(36.5e6, rel=0.01)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        create_model("resnet19", 10)


def test_bad_stem_and_normalization():
    with pytest.raises(ValueError, match="stem must be one of"):
        create_model("resnet18", 10, stem="tiny")
    with pytest.raises(ValueError, match="positive std"):
        NormalizedModel(torch.nn.Identity(), (0.5,), (0.0,))


def test_pretrained_timm_weights_from_a_local_folder(tmp_path):
    """``--pretrained`` with timm's ``local-dir:`` name (the offline twin of a hub download): the
    folder's weights, a new head, a channel-adapted first conv; ``--no-pretrained`` random ones."""
    from timm.models import save_for_hf
    torch.manual_seed(0)
    saved = timm.create_model("resnet10t", num_classes=5)
    save_for_hf(saved, str(tmp_path))
    name = f"local-dir:{tmp_path}"
    ours = create_model(name, 7, 1, 32, stem="native", pretrained=True).backbone
    assert ours.fc.out_features == 7 and ours.conv1[0].in_channels == 1
    same = [k for k, v in saved.state_dict().items() if k.startswith("layer")]
    assert same and all(torch.equal(saved.state_dict()[k], ours.state_dict()[k]) for k in same)
    fresh = create_model(name, 7, 1, 32, stem="native", pretrained=False).backbone
    assert not torch.equal(fresh.layer1[0].conv1.weight, saved.layer1[0].conv1.weight)


def test_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no published weights: drop --pretrained"):
        create_model("preactresnet18_w16", 10, 3, 32, pretrained=True)
    with pytest.raises(ValueError, match="no config.json in"):
        create_model(f"local-dir:{tmp_path}", 10, 3, 32, pretrained=True)
