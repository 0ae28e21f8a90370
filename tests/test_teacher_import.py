"""delt teacher --import: pretrained weights from state-dict files or the torch hub cache."""

import json

import pytest
import torch
import torchvision
from delt.cli import main
from delt.config import ConfigError
from delt.data import IMAGENET_MEAN, IMAGENET_STD
from delt.models import TeacherMismatchError, load_checkpoint
from delt.teacher import TeacherConfig, train_teacher
from imagefolders import write_image_folder

SYNTH = "synthetic:classes=5,channels=3,size=16,train=2,test=4"


def _config(out, **overrides):
    values = dict(
        out=str(out), dataset=SYNTH, import_arch="resnet18", weights=None, amp="none",
        channels_last=False, progress=False, device="cpu",
    )  # fmt: skip
    values.update(overrides)
    return TeacherConfig(**values)


def _random_resnet18(num_classes, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "model+module"])
def test_import_a_state_dict_file(tmp_path, wrapping):
    state = _random_resnet18(5)
    if wrapping == "state_dict":
        payload = {"state_dict": state, "epoch": 3}
    elif wrapping == "model+module":
        payload = {"model": {f"module.{k}": v for k, v in state.items()}}
    else:
        payload = state
    torch.save(payload, tmp_path / "w.pth")
    result = train_teacher(_config(tmp_path / "t", weights=str(tmp_path / "w.pth")))
    checkpoint = load_checkpoint(result.path)
    for key, value in checkpoint.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    meta = json.loads(result.path.with_suffix(".json").read_text())
    assert meta["weights"]["source"] == "file"
    from delt.io import sha256_file

    assert meta["weights"]["sha256"] == sha256_file(tmp_path / "w.pth")
    assert meta["arch"] == "resnet18" and meta["test_accuracy"] is None
    assert result.test_accuracy is None and not result.reused
    # Cached: the same import again reuses it; other weights into the same --out are refused.
    assert train_teacher(_config(tmp_path / "t", weights=str(tmp_path / "w.pth"))).reused
    torch.save(_random_resnet18(5, seed=1), tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="weights SHA-256"):
        train_teacher(_config(tmp_path / "t", weights=str(tmp_path / "w.pth")))


def test_import_measure_reports_top1(tmp_path):
    torch.save(_random_resnet18(5), tmp_path / "w.pth")
    result = train_teacher(_config(tmp_path / "t", weights=str(tmp_path / "w.pth"), measure=True))
    assert result.test_accuracy is not None and 0 <= result.test_accuracy <= 100
    # 5 classes x 4 test images: the accuracy is a multiple of 5 %.
    assert result.test_accuracy % 5 == 0
    assert load_checkpoint(result.path).meta["test_accuracy"] == result.test_accuracy


def test_import_into_imagenet_style_folder_takes_its_normalization(tmp_path):
    root = write_image_folder(tmp_path / "data", ["n02", "n01", "n03"], train=1, val=2, size=20)
    torch.save(_random_resnet18(3), tmp_path / "w.pth")
    result = train_teacher(
        _config(
            tmp_path / "t", dataset="imagefolder", data_root=str(root), resolution=16,
            weights=str(tmp_path / "w.pth"), measure=True,
        )
    )  # fmt: skip
    info = load_checkpoint(result.path).info
    assert info.class_names == ("n01", "n02", "n03")  # sorted WNIDs: torchvision's order
    assert info.mean == IMAGENET_MEAN and info.std == IMAGENET_STD and info.resolution == 16


def test_torchvision_name_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    dataset = "synthetic:classes=1000,channels=3,size=16,train=1,test=1"
    with pytest.raises(FileNotFoundError) as error:
        train_teacher(_config(tmp_path / "t", dataset=dataset, weights="IMAGENET1K_V1"))
    expected = tmp_path / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(error.value) and "never downloads" in str(error.value)
    assert not (tmp_path / "t" / "teacher.pt").exists()
    expected.parent.mkdir(parents=True)
    state = _random_resnet18(1000)
    torch.save(state, expected)
    result = train_teacher(_config(tmp_path / "t", dataset=dataset, weights="DEFAULT"))
    meta = load_checkpoint(result.path).meta
    assert meta["weights"]["source"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert meta["weights"]["path"] == str(expected)
    # The 5-class dataset: torchvision's 1000 categories do not fit.
    with pytest.raises(TeacherMismatchError, match="1000 classes.*has 5"):
        train_teacher(_config(tmp_path / "t5", weights="ResNet18_Weights.IMAGENET1K_V1"))


def test_wrong_class_count_and_key_mismatch_are_errors(tmp_path):
    torch.save(_random_resnet18(7), tmp_path / "seven.pth")
    with pytest.raises(TeacherMismatchError, match=r"7 classes \(fc.weight is \(7, 512\)\)"):
        train_teacher(_config(tmp_path / "a", weights=str(tmp_path / "seven.pth")))
    state = _random_resnet18(5)
    state["extra.weight"] = state.pop("layer4.1.bn2.weight")
    torch.save(state, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"missing keys \[layer4.1.bn2.weight\]; unexpected keys"):
        train_teacher(_config(tmp_path / "b", weights=str(tmp_path / "keys.pth")))
    for out in ("a", "b"):
        assert not (tmp_path / out / "teacher.pt").exists()


def test_import_of_a_registered_arch(tmp_path, tiny_teacher):
    # A plain state dict of one of our own architectures (RDED/DELT ship such teachers).
    state = load_checkpoint(tiny_teacher.path).model.state_dict()
    torch.save(state, tmp_path / "convnet.pt")
    dataset = load_checkpoint(tiny_teacher.path).info.name
    weights = str(tmp_path / "convnet.pt")
    # Width 128 by default, the weights' is 8: the shapes are listed.
    with pytest.raises(ValueError, match=r"other shapes \[features.0.weight \(8, 3, 3, 3\) vs"):
        train_teacher(
            _config(tmp_path / "a", dataset=dataset, import_arch="convnet2", weights=weights)
        )
    result = train_teacher(
        _config(tmp_path / "b", dataset=dataset, import_arch="convnet2", weights=weights, width=8)
    )
    for key, value in load_checkpoint(result.path).model.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"weights": None}, "--import needs --weights"),
        ({"import_arch": None, "weights": "w.pth"}, "--weights applies with --import"),
        ({"import_arch": None, "measure": True}, "--measure applies with --import"),
        ({"import_arch": "nonesuch", "weights": "w.pth"}, "--import 'nonesuch'"),
        ({"weights": "w.pth", "save_epochs": (1,)}, "--save-epochs applies to training"),
    ],
)
def test_import_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [
        (["--weights", str(tmp_path / "none.pth")], "--weights"),
        (["--weights", "IMAGENET1K_V9"], "not a torchvision weights name"),
    ]
    for extra, message in cases:
        argv = ["teacher", "--import", "resnet18", "--dataset", SYNTH, "--out", str(tmp_path / "o")]
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    torch.save(_random_resnet18(5), tmp_path / "w.pth")
    argv = ["teacher", "--import", "resnet18", "--weights", str(tmp_path / "w.pth")]
    # An output path that cannot be written: exit status 1, as every command (delt.cli).
    assert main(argv + ["--dataset", SYNTH, "--out", str(tmp_path / "file")]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(argv + ["--dataset", SYNTH, "--out", str(tmp_path / "ok"), "--measure"]) == 0
    assert "imported from file, test accuracy" in capsys.readouterr().out
