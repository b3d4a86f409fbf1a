"""TensorBoard and the report as a person sees them: the `redundancy` section first in the
SCALARS tab, `redundancy_probe/snapshot_step` written as documented, heatmaps with axes
and a colour scale, and report files readable by others (mode per the umask)."""

from __future__ import annotations

import io
import os
import stat

import numpy as np
import pytest
from conftest import tiny_batch, tiny_model
from fault_fixtures import event_accumulator

from redundancy_monitor import AlertConfig, ProbeSchedule, RedundancyMonitor, read_records
from redundancy_monitor.monitoring.heatmap_axes import text_mask
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.tensorboard import (
    VIRIDIS,
    TensorBoardSink,
    heatmap_image,
    heatmap_with_axes,
    pair_matrix,
)
from redundancy_monitor.tools.report import write_report

QUIET = AlertConfig(
    gap_threshold=None, growth_factor=None, overlap_threshold=None, regime_change=False
)


# -- the order of sections in TensorBoard's SCALARS tab ------------------------------
# A port of the tag comparator of TensorBoard's web UI (2.x, `compareTagNames`: "/", "_"
# and digits compare equal to one another and before any other character; runs of digits
# compare as numbers) and of its grouping by the part before the first "/", in the order
# of each group's first tag in that sort.


def _is_break(ch: str) -> bool:
    return ch in "/_" or ch.isdigit()


def _number_end(s: str, i: int) -> int:
    while i < len(s) and (s[i].isdigit() or s[i] == "."):
        i += 1
    return i


def compare_tag_names(a: str, b: str) -> int:
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i2, j2 = _number_end(a, i + 1), _number_end(b, j + 1)
            x, y = float(a[i:i2].rstrip(".")), float(b[j:j2].rstrip("."))
            if x != y:
                return -1 if x < y else 1
            i, j = i2, j2
            continue
        if _is_break(a[i]):
            if not _is_break(b[j]):
                return -1
        else:
            if _is_break(b[j]):
                return 1
            if a[i] != b[j]:
                return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def scalars_tab_sections(tags: list[str]) -> list[str]:
    import functools

    ordered = sorted(tags, key=functools.cmp_to_key(compare_tag_names))
    sections: list[str] = []
    for tag in ordered:
        section = tag.split("/", 1)[0]
        if section not in sections:
            sections.append(section)
    return sections


def test_the_comparator_port_reproduces_the_reported_order_of_the_old_names():
    old = ["redundancy/d_int_mean", "redundancy/gap_mean", "redundancy_by_separation/d1/gap_mean"]
    assert scalars_tab_sections(old) == ["redundancy_by_separation", "redundancy"]


def probed_run(tmp_path, steps=(0, 3)):
    mon = RedundancyMonitor(
        tiny_batch(3, 8)[0],
        executor="inline",
        schedule=ProbeSchedule(1, log_spaced=False, at_train_end=False),
        jsonl_path=tmp_path / "redundancy.jsonl",
        alerts=QUIET,
    )
    sink = TensorBoardSink(log_dir=tmp_path, per_pair=True)
    mon.sinks.append(sink)
    model = tiny_model("llama", 4)
    for step in steps:
        mon.step(step, model)
    mon.close()
    return event_accumulator(tmp_path), mon


def test_scalars_tab_lists_redundancy_first_and_snapshot_step_is_written(tmp_path):
    acc, _ = probed_run(tmp_path)
    tags = acc.Tags()["scalars"]
    sections = scalars_tab_sections(tags)
    assert sections[0] == "redundancy", sections
    assert {"redundancy_separation", "redundancy_detail", "redundancy_pairs"} <= set(sections)
    snapshot = acc.Scalars("redundancy_probe/snapshot_step")
    assert [(e.step, e.value) for e in snapshot] == [(0, 0.0), (3, 3.0)]


def decode(event) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def find(image: np.ndarray, part: np.ndarray) -> bool:
    """Whether `part` (an RGB image) occurs in `image` pixel for pixel."""
    h, w = part.shape[:2]
    for y in range(image.shape[0] - h + 1):
        for x in range(image.shape[1] - w + 1):
            if image[y, x, 0] == part[0, 0, 0] and np.array_equal(
                image[y : y + h, x : x + w], part
            ):
                return True
    return False


def test_heatmaps_have_slot_numbers_axis_titles_and_a_colour_bar(tmp_path):
    acc, _ = probed_run(tmp_path, steps=(0,))
    [event] = acc.Images("redundancy/heatmap/d_repl")
    image = decode(event)
    [line] = [r for r in read_records(tmp_path / "redundancy.jsonl") if r["type"] == "probe"]
    result = ProbeRecord.from_dict(line).result
    matrix = pair_matrix(result, "d_repl")
    assert np.array_equal(image, heatmap_with_axes(matrix))  # what was written, exactly
    assert find(image, heatmap_image(matrix))  # the cells, unchanged, inside a frame
    dark = np.all(image < 60, axis=-1)
    for text, rotate in (("block j", False), ("slot i", True), ("3", False)):
        mask = text_mask(text)
        mask = np.rot90(mask) if rotate else mask
        h, w = mask.shape
        assert any(
            np.array_equal(dark[y : y + h, x : x + w] & mask, mask)
            and not (dark[y : y + h, x : x + w] & ~mask).any()
            for y in range(image.shape[0] - h + 1)
            for x in range(image.shape[1] - w + 1)
        ), text
    # The colour bar: viridis from the top (the max) to the bottom (0), labelled with both.
    top, bottom = VIRIDIS[-1].astype(np.uint8), VIRIDIS[0].astype(np.uint8)
    columns = [x for x in range(image.shape[1]) if (image[:, x] == top).all(-1).any()]
    assert columns and all((image[:, x] == bottom).all(-1).any() for x in columns)
    scale = float(np.nanmax(matrix))
    from redundancy_monitor.monitoring.heatmap_axes import number

    label = text_mask(number(scale))
    h, w = label.shape
    assert any(
        np.array_equal(dark[y : y + h, x : x + w], label)
        for y in range(image.shape[0] - h + 1)
        for x in range(columns[-1], image.shape[1] - w + 1)
    )


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_report_and_its_pngs_are_written_with_the_mode_the_umask_gives(tmp_path, umask, mode):
    probed_run(tmp_path)
    old = os.umask(umask)
    try:
        report = write_report(tmp_path)
    finally:
        os.umask(old)
    for path in [report.html, *report.images.values()]:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
    assert len(report.images) >= 4
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # still written through a temporary file and a rename
