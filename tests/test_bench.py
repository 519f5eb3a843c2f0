"""``streamer bench``'s equality check compares token ids in every case (warm, live, cold) and can
fail: a server answering with shifted positions is reported ``tokens_equal=false``, an honest one
``true`` (tiny model, 4 frames)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.benchmark.bench import Scenario, report, run
from streamer.inference.tiny import ensure_tiny_model

pytestmark = pytest.mark.slow

SMALL = Scenario(depth_factor=1, frames=4, side=112, clients=2, new_tokens=8)


@pytest.mark.parametrize("shift", [0, 1])
def test_bench_reports_whether_token_ids_equal_the_references_in_every_case(
    streamer_cache: Path, shift: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shifted by one position (the hidden --fault-shift-position), every case differs and the bench says so."""
    result = run(
        SMALL,
        folder=ensure_tiny_model("tiny-random-instruct"),
        fault_shift_position=shift,
        live_questions=1,
        cold_questions=1,
    )
    assert result["tokens_equal"] is (shift == 0)
    assert bool(result["mismatches"]) is (shift != 0)
    assert result["ours_ttft"] > 0 and result["ref_ttft"] > 0
    live, cold = result["live"], result["cold"]
    assert live["tokens_equal"] is cold["tokens_equal"] is (shift == 0)  # the hook reaches every case
    (row,) = live["rows"]
    assert row["capture"] > 0 and row["pairs_missing"] is not None and row["prefix_ready"] is not None
    assert cold["rate"] > 0 and cold["ref_rate"] > 0 and cold["burst_windows"] == 1
    capsys.readouterr()
    report(result)
    printed = capsys.readouterr().out.strip().splitlines()
    assert "vision tokens" in printed[0] and "cores" in printed[0]  # every figure's frames, tokens and hardware
    names = [field.split("=")[0] for field in printed[-1].split()]
    assert names == [
        "ttft_ratio",
        "live_ttft_ratio",
        "live_capture_ratio",
        "cold_ttft_ratio",
        "throughput_ratio",
        "tokens_equal",
    ]
    assert printed[-1].endswith(f"tokens_equal={str(shift == 0).lower()}")
    # Throughput is against the reference's rate right after the burst, on its frames.
    throughput = float(printed[-1].split("throughput_ratio=")[1].split()[0])
    assert throughput == pytest.approx(cold["rate"] / cold["ref_rate"], abs=0.01)
