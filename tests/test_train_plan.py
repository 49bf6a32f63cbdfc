"""The plan's arithmetic, against hand counts."""

import pytest

from lorasmith.train.plan import (assign_bucket, batches_per_epoch, bucket_resolutions, closes_window, make_plan,
                                  steps_done, warmup_steps)


def test_bucket_resolutions_are_area_limited_multiples_of_64():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets and (640, 384) in buckets
    assert len(buckets) == 17  # Kohya's set for max 512², sides 256-1024
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert (576, 576) not in buckets


@pytest.mark.parametrize(
    "size, bucket",
    [((512, 512), (512, 512)), ((768, 768), (512, 512)), ((768, 512), (640, 384)), ((512, 768), (384, 640)),
     ((640, 448), (576, 448)), ((1000, 250), (1024, 256))],
)
def test_assign_bucket(size, bucket):
    assert assign_bucket(size, bucket_resolutions(512, 256, 1024, 64)) == bucket


@pytest.mark.parametrize(
    "buckets, batch, expected",
    [({(512, 512): 10}, 2, 5), ({(512, 512): 11}, 2, 6), ({(512, 512): 3, (576, 448): 3}, 2, 4),
     ({(512, 512): 1, (576, 448): 1, (448, 576): 1}, 4, 3), ({}, 2, 0)],
)
def test_batches_per_epoch_rounds_each_bucket_up(buckets, batch, expected):
    assert batches_per_epoch(buckets, batch) == expected


@pytest.mark.parametrize("value, total, expected", [(0.1, 1000, 100), (0.05, 30, 2), (50, 1000, 50), (0, 10, 0)])
def test_warmup_steps(value, total, expected):
    assert warmup_steps(value, total) == expected


PLANS = [
    # (train buckets, reg buckets, batch, accumulation, processes, epochs, max steps, steps/epoch, total)
    ({(512, 512): 10 * 20}, {}, 2, 1, 1, 10, 0, 100, 1000),  # the guides' 10 images × 20 repeats × 10 / 2
    ({(512, 512): 150, (576, 448): 51}, {}, 2, 1, 1, 2, 0, 75 + 26, 202),  # a remainder in each bucket
    ({(512, 512): 200}, {(512, 512): 200}, 2, 1, 1, 10, 0, 200, 2000),  # regularisation doubles
    ({(512, 512): 200}, {}, 2, 4, 1, 10, 0, 25, 250),  # accumulation divides
    ({(512, 512): 200}, {}, 2, 1, 2, 10, 0, 50, 500),  # two processes split the batches
    ({(512, 512): 201}, {}, 2, 1, 2, 1, 0, 51, 51),  # 101 batches over 2 processes: 51 each
    ({(512, 512): 200}, {}, 2, 1, 1, 10, 250, 100, 250),  # max_train_steps wins
    ({(512, 512): 3}, {}, 1, 2, 1, 2, 0, 2, 4),  # 3 batches, accumulation 2: the last, partial window steps too
    ({(512, 512): 201}, {}, 2, 4, 1, 3, 0, 26, 78),  # 101 batches: 25 whole windows and one of 1
    ({(512, 512): 201}, {}, 2, 4, 2, 1, 0, 13, 13),  # 51 batches per process: 12 whole windows and one of 3
    ({(512, 512): 5}, {}, 1, 8, 1, 3, 0, 1, 3),  # accumulation beyond the epoch: one step per epoch
    ({(512, 512): 5}, {}, 1, 2, 1, 10, 7, 3, 7),  # max_train_steps with partial windows: 3 epochs begun
]


@pytest.mark.parametrize("train, reg, batch, accum, procs, epochs, max_steps, per_epoch, total", PLANS)
def test_make_plan(train, reg, batch, accum, procs, epochs, max_steps, per_epoch, total):
    plan = make_plan(train, reg, 10, 10 if reg else 0, batch, accum, procs, epochs, max_steps, 0.1, 0)
    assert (plan.steps_per_epoch, plan.total_steps) == (per_epoch, total)
    assert plan.warmup == round(0.1 * total)


WINDOWS = [
    # (batches per process, accumulation, micro-batches that end a window, from 0)
    (6, 1, [0, 1, 2, 3, 4, 5]),
    (6, 2, [1, 3, 5]),
    (3, 2, [1, 2]),
    (7, 3, [2, 5, 6]),
    (2, 5, [1]),
]


@pytest.mark.parametrize("per_process, accum, ends", WINDOWS)
def test_windows_end_at_each_epoch_end_and_agree_with_the_plan(per_process, accum, ends):
    """The loop steps where `closes_window` says; the plan counts as many steps, and a state's data position
    (epoch, micro-batches done) maps back to the step it was written at."""
    assert [i for i in range(per_process) if closes_window(i, per_process, accum)] == ends
    plan = make_plan({(512, 512): per_process}, {}, per_process, 0, 1, accum, 1, epochs=3)
    assert plan.steps_per_epoch == len(ends) and plan.total_steps == 3 * len(ends)
    step = 0
    for epoch in (1, 2, 3):
        for index in ends:
            step += 1
            assert steps_done(epoch, index + 1, per_process, accum) == step
        assert steps_done(epoch + 1, 0, per_process, accum) == step  # a state written at the epoch's end
    assert step == plan.total_steps


def test_plan_saves_and_lines():
    plan = make_plan({(512, 512): 40}, {}, images=4, reg_images=0, batch_size=4, epochs=6, warmup=0.1, save_every=2)
    assert plan.save_epochs == [2, 4]
    text = "\n".join(plan.lines())
    assert "optimizer steps: 10 per epoch × 6 epochs = 60; warmup 6" in text
    assert "saves after epochs: 2, 4" in text
    assert plan.epochs == 6 and plan.image_views == 40

    plan.held_out = 1
    assert plan.lines()[0] == "images: 4; 1 more held out for the validation loss; 40 image views per epoch"
