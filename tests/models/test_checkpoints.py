"""Checkpoints: the official parameter names and shapes (shapes manifest), strict loading of files built
from it (restoration, contrastive extractor, torchvision-format VGG19), wrapped/prefixed checkpoints and
clear errors for mismatched ones."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import amsa
from amsa.models.checkpoints import CheckpointError

# Every parameter name and shape of the official checkpoints (copied from the project's reference material).
MANIFEST = Path(__file__).with_name("official_state_dict_shapes.json")

# torchvision's vgg19().features: indices of the 16 convolutions and their (out, in) channels.
TV_VGG19_CONVS = dict(zip(
    (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34),
    ((64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (256, 256),
     (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)),
))


def manifest(key: str) -> dict:
    return json.loads(MANIFEST.read_text())[key]


def random_state_dict(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s) for k, s in shapes.items()}


def torchvision_vgg19() -> dict[str, torch.Tensor]:
    sd = {}
    for i, (c_out, c_in) in TV_VGG19_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3)
        sd[f"features.{i}.bias"] = torch.randn(c_out)
    sd["classifier.0.weight"] = torch.randn(8, 8)  # the classifier is dropped by the converter
    return sd


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kw)


def test_restoration_net_has_the_official_names_shapes_and_parameter_count():
    official = manifest("AMSA_RestorationNet")
    net = amsa.RestorationNet()
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == official["shapes"]
    assert sum(p.numel() for p in net.parameters()) == official["num_params"] == 9_676_454


def test_extractors_have_the_official_names_and_shapes():
    vgg = quiet(amsa.VGGFeatures, "vgg19", ("relu1_1", "relu2_1", "relu3_1"))
    for key, module in (("ContrasExtractorSep", quiet(amsa.ContrasExtractorSep)), ("VGG19_to_relu3_1", vgg)):
        official = manifest(key)
        assert {k: list(v.shape) for k, v in module.state_dict().items()} == official["shapes"], key
        assert sum(p.numel() for p in module.parameters()) == official["num_params"], key


def test_all_three_checkpoints_load_strictly_from_files(tmp_path):
    restoration = random_state_dict(manifest("AMSA_RestorationNet")["shapes"])
    features = random_state_dict(manifest("ContrasExtractorSep")["shapes"])
    vgg = torchvision_vgg19()
    files = {"restoration.pth": restoration, "feature_extraction.pth": features, "vgg19.pth": vgg}
    for name, sd in files.items():
        torch.save(sd, tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with every weight given, nothing may warn
        model = amsa.AMSA(weights=tmp_path / "restoration.pth",
                          feature_weights=str(tmp_path / "feature_extraction.pth"),
                          vgg_weights=tmp_path / "vgg19.pth")
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, restoration[k]), k
    for k, v in model.matching_extractor.state_dict().items():
        assert torch.equal(v, features[k]), k
    assert torch.equal(model.vgg.vgg_net.conv1_1.weight, vgg["features.0.weight"])
    assert torch.equal(model.vgg.vgg_net.conv2_1.bias, vgg["features.5.bias"])
    assert torch.equal(model.vgg.vgg_net.conv3_1.weight, vgg["features.10.weight"])
    assert torch.allclose(model.vgg.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_vgg19_relu5_1_from_torchvision_format():
    vgg = torchvision_vgg19()
    features = amsa.VGGFeatures("vgg19", ("relu5_1",), weights=vgg)
    assert torch.equal(features.vgg_net.conv5_1.weight, vgg["features.28.weight"])
    assert "conv5_2" not in dict(features.vgg_net.named_children())
    x = torch.rand(1, 3, 32, 48)
    assert features(x)["relu5_1"].shape == (1, 512, 2, 3)


def test_vgg_features_equal_a_direct_computation():
    """relu2_1 computed by hand from the torchvision-format weights (normalise, conv, relu, conv, relu,
    pool, conv, relu) in float64."""
    vgg = {k: v * 0.1 for k, v in torchvision_vgg19().items()}
    features = amsa.VGGFeatures("vgg19", ("relu1_1", "relu2_1"), weights=vgg).double()
    vgg = {k: v.double() for k, v in vgg.items()}
    x = torch.rand(2, 3, 10, 14, dtype=torch.float64)
    # The official buffers are float32: the float64 module holds their float32 values.
    mean = torch.tensor([0.485, 0.456, 0.406]).double().view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).double().view(1, 3, 1, 1)

    def conv(t, i):
        w, b = vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]
        return torch.relu(torch.nn.functional.conv2d(t, w, b, padding=1))

    relu1_1 = conv((x - mean) / std, 0)
    relu2_1 = conv(torch.nn.functional.max_pool2d(conv(relu1_1, 2), 2), 5)
    out = features(x)
    torch.testing.assert_close(out["relu1_1"], relu1_1)
    torch.testing.assert_close(out["relu2_1"], relu2_1)


@pytest.mark.parametrize("wrap", ["params", "state_dict", "module", "params+module"])
def test_wrapped_and_prefixed_checkpoints_load(wrap, tmp_path):
    sd = random_state_dict(manifest("ContrasExtractorSep")["shapes"])
    if "module" in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"params": sd, "iter": 3} if wrap.startswith("params") else sd
    obj = {"state_dict": sd} if wrap == "state_dict" else obj
    torch.save(obj, tmp_path / "ckpt.pth")
    ext = amsa.ContrasExtractorSep(weights=tmp_path / "ckpt.pth")
    key = "feature_extraction_image2.model.conv3_1.weight"
    assert torch.equal(ext.state_dict()[key], sd[key] if key in sd else sd[f"module.{key}"])


def test_mismatched_checkpoint_names_the_file_and_the_keys(tmp_path):
    sd = random_state_dict(manifest("AMSA_RestorationNet")["shapes"])
    del sd["content_extractor.conv_first.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["dyn_agg_restore.small_dyn_agg.conv_offset_mask.weight"] = torch.zeros(9, 256, 3, 3)
    path = tmp_path / "bad_restoration.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        quiet(amsa.AMSA, weights=path)
    msg = str(err.value)
    assert "bad_restoration.pth" in msg
    assert "1 missing keys" in msg and "content_extractor.conv_first.bias" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg
    assert "1 wrong shapes" in msg
    assert "small_dyn_agg.conv_offset_mask.weight: checkpoint (9, 256, 3, 3) vs model (216, 256, 3, 3)" in msg


def test_a_tiny_net_rejects_the_full_size_checkpoint():
    sd = random_state_dict(manifest("AMSA_RestorationNet")["shapes"])
    with pytest.raises(CheckpointError, match="missing keys|wrong shapes"):
        quiet(amsa.AMSA, ngf=8, n_blocks=1, weights=sd)


def test_missing_file_and_garbage_raise():
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        quiet(amsa.AMSA, weights="no_such.pth")
    with pytest.raises(CheckpointError, match="no tensors found"):
        amsa.ContrasExtractorSep(weights={"epoch": 3})


def test_missing_weights_warn_for_each_part():
    with pytest.warns(UserWarning) as record:
        amsa.AMSA(ngf=8, n_blocks=1)
    text = " ".join(str(w.message) for w in record)
    assert "AMSA: no restoration weights" in text
    assert "ContrasExtractorSep: no weights" in text
    assert "VGGFeatures('vgg19'): no weights" in text
