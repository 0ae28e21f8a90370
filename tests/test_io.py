"""delt.io: atomic writes, image files and their 8-bit conversion."""

import delt.io as io_module
import pytest
import torch
from delt.io import (
    atomic_open,
    read_json,
    save_image,
    to_uint8,
    torch_load,
    torch_save,
    write_json,
)


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


def test_jpeg_pixels_truncate_like_the_papers_png_pixels_round():
    import numpy as np

    # x * 255 = 254.745, 100.6, 0.9, 255, 0 after clamping: rounding and truncation differ on
    # the first three.
    values = torch.tensor([0.999, 100.6 / 255, 0.9 / 255, 1.2, -0.3]).view(1, 1, 5)
    assert to_uint8(values, "jpeg").view(-1).tolist() == [254, 100, 0, 255, 0]
    assert to_uint8(values, "png").view(-1).tolist() == [255, 101, 1, 255, 0]
    # The papers' formula, bit for bit: clamp to [0, 1], then (x * 255).astype(np.uint8).
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    papers = (image.clamp(0, 1).numpy() * 255).astype(np.uint8)
    assert np.array_equal(to_uint8(image, "jpeg").numpy(), papers)
    assert to_uint8(image, "jpeg").dtype == torch.uint8 and to_uint8(image).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="image_format"):
        to_uint8(image, "gif")


def test_save_image_encodes_the_converted_pixels(tmp_path, monkeypatch):
    seen = []
    original = io_module.to_uint8

    def spy(image, image_format="png"):
        seen.append(image_format)
        return original(image, image_format)

    monkeypatch.setattr(io_module, "to_uint8", spy)
    image = torch.full((3, 4, 4), 0.999)
    save_image(image, tmp_path / "x.jpg", "jpeg")
    save_image(image, tmp_path / "x.png", "png")
    assert seen == ["jpeg", "png"]
