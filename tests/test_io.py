"""delt.io: atomic writes."""

import pytest
import torch
from delt.io import atomic_open, read_json, save_image, torch_load, torch_save, write_json


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("{half")
            raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    write_json(tmp_path / "x.json", {})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_torch_round_trip_is_weights_only(tmp_path):
    torch_save({"x": torch.arange(3)}, tmp_path / "a" / "b.pt")
    assert torch.equal(torch_load(tmp_path / "a" / "b.pt")["x"], torch.arange(3))


def test_save_image_png_is_lossless_and_jpeg_works(tmp_path):
    import numpy as np
    from PIL import Image

    image = torch.randint(0, 256, (3, 5, 7)).float() / 255
    save_image(image, tmp_path / "x.png")
    back = torch.from_numpy(np.array(Image.open(tmp_path / "x.png"))).permute(2, 0, 1)
    assert torch.equal(back, (image * 255).round().to(torch.uint8))
    save_image(image[:1], tmp_path / "g.jpg", "jpeg")
    assert Image.open(tmp_path / "g.jpg").format == "JPEG"
    with pytest.raises(ValueError, match="image_format"):
        save_image(image, tmp_path / "x.gif", "gif")
