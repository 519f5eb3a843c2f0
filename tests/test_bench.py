"""``streamer bench``'s equality check compares token ids and can fail: a server answering with
shifted positions is reported ``tokens_equal=false``, an honest one ``true`` (tiny model, 4 frames)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.benchmark.bench import Scenario, run
from streamer.inference.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

SMALL = Scenario(depth_factor=1, frames=4, side=112, clients=2, new_tokens=8)


@pytest.mark.parametrize("shift", [0, 1])
def test_bench_reports_whether_the_servers_token_ids_equal_the_references(streamer_cache: Path, shift: int) -> None:
    """Shifted by one position (the hidden --fault-shift-position), the answers differ and the bench says so."""
    result = run(SMALL, folder=ensure_tiny_model("tiny-random-instruct"), fault_shift_position=shift)
    assert result["tokens_equal"] is (shift == 0)
    assert bool(result["mismatches"]) is (shift != 0)
    assert result["ours_ttft"] > 0 and result["ref_ttft"] > 0
