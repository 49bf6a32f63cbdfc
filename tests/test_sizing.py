import math

import pytest

from lorasmith.common.sizing import (
    Box,
    auto_repeats,
    best_window,
    candidate_sizes,
    choose_size,
    cover_scale,
    crop_box,
    draft_request,
    is_small,
)


@pytest.mark.parametrize(
    "size, bounds, expected",
    [
        ((1000, 1000), (512, 768), (768, 768)),  # square: largest square it covers
        ((600, 600), (512, 768), (576, 576)),  # square between bounds: no upscale on ties
        ((400, 400), (512, 768), (512, 512)),  # too small for every square: the smallest
        ((4000, 3000), (512, 768), (768, 576)),  # 4:3 exactly
        ((3000, 4000), (512, 768), (576, 768)),  # portrait 3:4
        ((6000, 4000), (512, 768), (768, 512)),  # 3:2
        ((1600, 600), (512, 768), (768, 512)),  # panorama: widest available
        ((700, 600), (512, 768), (768, 640)),  # 7:6 is closest to 6:5
        ((1920, 1080), (512, 768), (768, 512)),  # 16:9 → 3:2 is the widest
        ((1000, 1000), (512, 512), (512, 512)),  # a 512-only run
        ((2000, 1000), (512, 1024), (1024, 512)),  # wider bounds allow 2:1
        ((8000, 6000), (512, 768), (768, 576)),
    ],
)
def test_choose_size(size, bounds, expected):
    assert choose_size(*size, *bounds) == expected


@pytest.mark.parametrize("w, h", [(517, 389), (3001, 2002), (640, 1200), (5000, 512), (777, 777)])
def test_choose_size_is_a_closest_ratio_multiple_of_64(w, h):
    tw, th = choose_size(w, h)
    assert tw % 64 == 0 and th % 64 == 0 and 512 <= tw <= 768 and 512 <= th <= 768
    best = min(abs(math.log(a / b) - math.log(w / h)) for a, b in candidate_sizes())
    assert abs(math.log(tw / th) - math.log(w / h)) == pytest.approx(best)


@pytest.mark.parametrize(
    "bounds, count, first, last",
    [((512, 768), 25, (512, 512), (768, 768)), ((500, 700), 9, (512, 512), (640, 640)), ((512, 512), 1, (512, 512), (512, 512))],
)
def test_candidate_sizes(bounds, count, first, last):
    sizes = candidate_sizes(*bounds)
    assert len(sizes) == count and sizes[0] == first and sizes[-1] == last


@pytest.mark.parametrize("bounds", [(710, 760), (768, 512), (0, 512)])
def test_candidate_sizes_rejects_empty_ranges(bounds):
    with pytest.raises(ValueError):
        candidate_sizes(*bounds)


@pytest.mark.parametrize(
    "size, target, offset, box",
    [
        ((1000, 500), (512, 512), 0.5, Box(250, 0, 750, 500)),
        ((1000, 500), (512, 512), 0.0, Box(0, 0, 500, 500)),
        ((1000, 500), (512, 512), 1.0, Box(500, 0, 1000, 500)),
        ((600, 1200), (512, 768), 0.5, Box(0, 150, 600, 1050)),
        ((600, 1200), (512, 768), 0.0, Box(0, 0, 600, 900)),
        ((768, 512), (768, 512), 0.5, Box(0, 0, 768, 512)),
    ],
)
def test_crop_box(size, target, offset, box):
    got = crop_box(*size, target, offset)
    assert got.as_list() == box.as_list()
    # the box always has the target's aspect ratio
    assert (got.right - got.left) / (got.bottom - got.top) == pytest.approx(target[0] / target[1])


@pytest.mark.parametrize(
    "size, target, scale",
    [((1000, 500), (512, 512), 1.024), ((400, 300), (768, 576), 1.92), ((8000, 6000), (768, 576), 0.096)],
)
def test_cover_scale(size, target, scale):
    assert cover_scale(*size, target) == pytest.approx(scale)


@pytest.mark.parametrize(
    "size, small", [((511, 2000), True), ((512, 512), False), ((400, 300), True), ((3000, 600), False)]
)
def test_is_small(size, small):
    assert is_small(*size) is small


@pytest.mark.parametrize(
    "profile, window, start",
    [
        ([0, 0, 5, 5, 0, 0], 2, 2),
        ([9, 0, 0, 0, 0, 0], 3, 0),
        ([0, 0, 0, 0, 1, 9], 2, 4),
        ([1, 1, 1, 1], 2, 0),  # ties: the first
        ([1, 2, 3], 5, 0),  # window wider than the profile
    ],
)
def test_best_window(profile, window, start):
    assert best_window(profile, window) == start


@pytest.mark.parametrize(
    "n, repeats",
    [(1, 1500), (10, 150), (11, 137), (15, 100), (20, 100), (200, 100), (0, 100)],
)
def test_auto_repeats(n, repeats):
    assert auto_repeats(n) == repeats
    if n:
        assert repeats >= 100 and n * repeats >= 1500


@pytest.mark.parametrize(
    "size, target, wanted",
    [((8000, 6000), (768, 576), (1536, 1152)), ((1000, 750), (768, 576), (1000, 750))],
)
def test_draft_request_keeps_twice_the_needed_size(size, target, wanted):
    assert draft_request(*size, target) == wanted


@pytest.mark.parametrize("size, expected", [
    ((2000, 2000), (1024, 1024)),
    ((1000, 1000), (1024, 1024)),  # the one square size
    ((3000, 2000), (1216, 832)),   # 3:2 → Kohya's SDXL bucket for it
    ((2000, 3000), (832, 1216)),
    ((1920, 1080), (1344, 768)),   # 16:9 → 7:4, not the small but exact 1024×576
    ((4000, 1000), (2048, 512)),   # a panorama: 4:1 fits 2048×512 = 1024²
])
def test_choose_size_by_area_as_sdxl_trains(size, expected):
    w, h = choose_size(*size, 512, 2048, area=1024)
    assert (w, h) == expected and w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0


def test_area_sizes_are_kohyas_sdxl_buckets():
    sizes = candidate_sizes(512, 2048, area=1024)
    def tallest(side: int) -> int:
        return min(2048, 1024 * 1024 // side // 64 * 64)

    for w, h in sizes:  # each is the largest for one of its sides
        assert w * h <= 1024 * 1024 and (h == tallest(w) or w == tallest(h))
    for bucket in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (2048, 512), (640, 1536)]:
        assert bucket in sizes
    assert (1024, 576) not in sizes  # not the largest height for its width
    with pytest.raises(ValueError, match="raise --area"):
        candidate_sizes(1024, 2048, area=512)
