"""`factory run --stages`: stage numbers are the ones conf/stages.yaml lists."""

from __future__ import annotations

import click
import pytest

from pipelines.orchestration import parse_stages


def test_stage_ranges_and_lists_are_read_in_order():
    assert parse_stages("1-3,8") == [1, 2, 3, 8]
    assert parse_stages("5,4,5") == [4, 5]


@pytest.mark.parametrize("text, message", [("0", "stages are 1 to 8"), ("3-9", "stages are 1 to 8"),
                                           ("4-2", "stages are 1 to 8"), ("two", "use stage numbers")])
def test_unknown_stages_are_refused_naming_the_known_ones(text, message):
    with pytest.raises(click.BadParameter, match=message):
        parse_stages(text)
