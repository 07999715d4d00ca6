from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossdistill.models import get_model, list_models, official_mu


def test_registry_lists_the_paper_models() -> None:
    assert {"resnet20", "resnet32", "resnet56", "vgg16", "lenet5", "resnet18", "mobilenet_v2"} <= set(list_models())


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str, in_channels: int, size: int) -> None:
    model = get_model(name, num_classes=7, in_channels=in_channels)
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)  # eval mode works on a single image


def test_name_is_normalised() -> None:
    assert type(get_model("ResNet-20", 10, 1)) is type(get_model("resnet20", 10, 1))
    assert type(get_model("MobileNetV2", 10, 1)) is type(get_model("mobilenet_v2", 10, 1))


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model") as err:
        get_model("resnet999")
    for name in list_models():
        assert name in str(err.value)


def test_official_mu_is_a_class_attribute_with_the_vgg_value_as_default() -> None:
    assert official_mu(get_model("resnet56", 10, 1)) == 0.9
    assert official_mu(get_model("resnet20", 10, 1)) == 0.9
    assert official_mu(get_model("vgg16", 10, 1)) == 0.6
    assert official_mu(get_model("lenet5", 10, 1)) == 0.6  # no official value: the release's default
    assert official_mu(get_model("mobilenet_v2", 10, 1)) == 0.2  # chosen on validation images (session 8)
    assert get_model("resnet56", 10, 1).prune_skip == [f"layer{s}.conv2" for s in ("1.7", "2.0", "3.0", "3.8")]
    assert get_model("resnet20", 10, 1).prune_skip == []
