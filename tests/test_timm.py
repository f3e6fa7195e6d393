"""timm as a second backbone provider, and the EfficientNet-Lite0 ImageNet weights mapped onto timm's
``tf_efficientnet_lite0`` (the real pretrained features this machine can have without a download)."""

from __future__ import annotations

import pytest
import torch

from tune_rice import cli, model, timm_zoo

timm = pytest.importorskip("timm")


# ------------------------------------------------------------------------ EfficientNet-Lite0 weights
def test_the_lite0_file_gives_the_logits_of_the_packages_own_model(tmp_path, capsys):
    """The mapped file in timm's network and the package's file in the package's network (the reference
    implementation it was made for) give the same ImageNet logits, to float32 rounding."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "lite0.pth"
    assert cli.main(["backbones", "--write-lite0", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ref = lite.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(model.safe_torch_load(timm_zoo.lite0_package_file()))
    ref.eval()
    resolved = model.resolve_weights(timm_zoo.LITE0_VALUE, str(out))
    assert resolved.pretrained and resolved.identity.startswith("file:lite0.pth:")
    ours, _ = model.build_backbone(timm_zoo.LITE0_VALUE, weights=resolved, feature_layer="logits")
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # (B, 3, 224, 224)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (4, 1000)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and they are ImageNet features, not noise: a wrong mapping would not keep the classes apart
    assert want.std() > 1.0


def test_mapping_in_order_refuses_tensors_that_do_not_pair():
    a = {"x.weight": torch.zeros(3, 2), "bn.num_batches_tracked": torch.tensor(5), "y": torch.ones(4)}
    b = {"p": torch.empty(3, 2), "q": torch.empty(4), "bn2.num_batches_tracked": torch.tensor(0)}
    mapped = timm_zoo.map_in_order(a, b)
    assert list(mapped) == ["p", "q", "bn2.num_batches_tracked"] and torch.equal(mapped["q"], torch.ones(4))
    with pytest.raises(ValueError, match=r"y \(4,\) does not map onto q \(5,\)"):
        timm_zoo.map_in_order(a, {"p": torch.empty(3, 2), "q": torch.empty(5)})
    with pytest.raises(ValueError, match="2 tensors to map onto 1"):
        timm_zoo.map_in_order(a, {"p": torch.empty(3, 2)})
