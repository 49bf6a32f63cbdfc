"""The sidecar logic of caption-folder with a fake captioner: what is written, kept, prefixed, skipped."""

import pytest
from PIL import Image

from conftest import training_root
from lorasmith.captioning.folder import CaptionOptions, add_prefixes, caption_folder, find_images, plan


class FakeCaptioner:
    """Captions each picture with its mean red value, and records the batch sizes it was handed."""

    name = "fake"

    def __init__(self):
        self.batches = []

    def caption(self, images):
        self.batches.append(len(images))
        return [f"red {sum(im.convert('RGB').getchannel('R').tobytes()) // (im.width * im.height)}" for im in images]


def run(folder, fake=None, **options):
    fake = fake or FakeCaptioner()
    opts = CaptionOptions(**options)
    return caption_folder(plan(find_images(folder), opts), fake, opts, progress=False), fake


def test_root_with_several_repeat_folders_and_a_single_folder(tmp_path):
    root = training_root(tmp_path, {"10_clay": 3, "5_style": 2})
    (root / "notes").mkdir()
    assert len(find_images(root)) == 5
    assert len(find_images(root / "5_style")) == 2
    summary, _ = run(root, prefix="claymation style")
    assert (summary.captioned, summary.kept, summary.failed) == (5, 0, [])
    text = (root / "10_clay" / "img0.txt").read_text(encoding="utf-8")
    assert text.startswith("claymation style, red ") and text.endswith("\n")
    assert not list(root.rglob("*.part"))


def test_existing_captions_are_kept_unless_overwrite(tmp_path):
    root = training_root(tmp_path, {"10_clay": 3})
    (root / "10_clay" / "img0.txt").write_text("my own words", encoding="utf-8")
    (root / "10_clay" / "img1.txt").write_text("  \n", encoding="utf-8")  # empty: counts as missing
    summary, fake = run(root, prefix="clay")
    assert (summary.captioned, summary.kept) == (2, 1)
    assert (root / "10_clay" / "img0.txt").read_text(encoding="utf-8") == "my own words"
    assert (root / "10_clay" / "img1.txt").read_text(encoding="utf-8").startswith("clay, red")
    summary, _ = run(root, prefix="clay", overwrite=True)
    assert summary.captioned == 3
    assert (root / "10_clay" / "img0.txt").read_text(encoding="utf-8").startswith("clay, red")


def test_prefix_only_adds_the_trigger_without_a_model(tmp_path):
    root = training_root(tmp_path, {"10_clay": 3})
    folder = root / "10_clay"
    (folder / "img0.txt").write_text("a ball, claymation style\n", encoding="utf-8")
    (folder / "img1.txt").write_text("claymation style, a cube\n", encoding="utf-8")
    opts = CaptionOptions(prefix="claymation style")
    summary = add_prefixes(plan(find_images(root), opts), opts)
    assert (summary.prefixed, summary.kept) == (2, 1)
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "claymation style, a ball\n"
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "claymation style, a cube\n"
    assert (folder / "img2.txt").read_text(encoding="utf-8") == "claymation style\n"


@pytest.mark.parametrize("batch_size, batches", [(1, [1] * 5), (2, [2, 2, 1]), (8, [5])])
def test_batching_gives_the_same_captions(tmp_path, batch_size, batches):
    root = training_root(tmp_path, {"3_x": 5})
    summary, fake = run(root, batch_size=batch_size)
    assert fake.batches == batches
    one_by_one = {p.name: p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.txt"))}
    for p in root.rglob("*.txt"):
        p.unlink()
    run(root, batch_size=1)
    assert {p.name: p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.txt"))} == one_by_one


def test_an_unreadable_picture_is_reported_and_the_rest_captioned(tmp_path):
    root = training_root(tmp_path, {"10_clay": 3})
    (root / "10_clay" / "img1.png").write_bytes(b"broken")
    summary, fake = run(root, batch_size=2)
    assert summary.captioned == 2
    assert [(p.name, reason.split(" (")[0]) for p, reason in summary.failed] == [("img1.png", "not a picture")]
    assert not (root / "10_clay" / "img1.txt").exists()
    assert fake.batches == [2]


def test_dry_run_writes_nothing(tmp_path):
    root = training_root(tmp_path, {"10_clay": 2})
    opts = CaptionOptions(prefix="clay")
    summary = caption_folder(plan(find_images(root), opts), FakeCaptioner(), opts, dry_run=True, progress=False)
    assert not list(root.rglob("*.txt"))
    assert [p.name for p, _ in summary.planned] == ["img0.txt", "img1.txt"]
    assert all(text.startswith("clay, red") for _, text in summary.planned)


def test_pictures_are_read_through_prep_loader(tmp_path):
    """EXIF rotation and transparency reach the captioner as prep makes them: upright, on white."""
    folder = tmp_path / "1_x"
    folder.mkdir()
    image = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    image.save(folder / "clear.png")
    seen = []

    class Spy(FakeCaptioner):
        def caption(self, images):
            seen.extend(images)
            return super().caption(images)

    run(folder, Spy())
    assert seen[0].mode == "RGB" and seen[0].getpixel((0, 0)) == (255, 255, 255)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        find_images(tmp_path / "missing")
