"""delt.io: atomic writes, image files and their 8-bit conversion."""

import json

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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_write_json_refuses_non_finite_numbers_naming_file_and_key(tmp_path, value):
    from delt.io import write_json

    path = tmp_path / "out.json"
    write_json(path, {"ok": 1})
    with pytest.raises(ValueError, match=r"out\.json: not written: stages\[1\]\.loss is not a "):
        write_json(path, {"stages": [{"loss": 1.0}, {"loss": value}]})
    assert json.loads(path.read_text()) == {"ok": 1}  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("text", ["NaN", '{"mean": Infinity}', "[-Infinity]"])
def test_read_json_refuses_nan_and_infinity_naming_the_file(tmp_path, text):
    from delt.io import FileFormatError, read_json

    path = tmp_path / "in.json"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=r"in\.json: not a readable .*not standard JSON"):
        read_json(path)


def test_read_image_scales_16_bit_and_keeps_8_bit_as_pil(tmp_path):
    import numpy as np
    from delt.io import read_image
    from PIL import Image

    eight = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "rgb.png")
    with Image.open(tmp_path / "rgb.png") as image:
        assert np.array_equal(np.asarray(read_image(tmp_path / "rgb.png")), np.asarray(image))
    sixteen = np.array([[0, 128, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    gray = np.asarray(read_image(tmp_path / "gray16.png", "L"))
    assert gray.tolist() == [[0, 0, 1, 128, 255]]
    rgb = np.asarray(read_image(tmp_path / "gray16.png", "RGB"))
    assert rgb.shape == (1, 5, 3) and (rgb[..., 0] == gray).all()


def test_a_16_bit_imagefolder_is_read_scaled(tmp_path):
    import numpy as np
    from delt.data import load_dataset
    from PIL import Image

    for split in ("train", "val"):
        for name, level in (("a", 20000), ("b", 50000)):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(folder / "0.png")
    dataset = load_dataset("imagefolder", "train", str(tmp_path), resolution=8)
    pixels = dataset.info.denormalize(torch.stack([dataset[i][0] for i in range(2)]))
    expected = torch.tensor([round(20000 * 255 / 65535), round(50000 * 255 / 65535)]) / 255
    assert torch.allclose(pixels.mean((1, 2, 3)), expected, atol=1e-5)
