"""A non-finite loss or cached gradient on one rank skips the step on every rank, and too many in a row stop."""

import math

import pytest

from jobs import run_worker


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    return run_worker("nonfinite", 2, tiny_model_dir, tmp_path_factory.mktemp("nonfinite"), [], timeout=600)


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_steps_are_skipped_then_stop_training(report, stage):
    ranks = report[f"zero{stage}"]["rank"]
    assert ranks[0] == ranks[1]  # every rank took the same decisions and holds the same parameters
    for steps in ranks:
        good, skipped, good_again, skipped_again, stopped = steps
        assert good["skipped"] == 0.0 and good["moved"] > 0 and math.isfinite(good["loss"])
        # NaN only on rank 1's embeddings, but no rank updates: every parameter is exactly as before
        assert skipped["skipped"] == 1.0 and skipped["moved"] == 0.0 and skipped["skipped_steps"] == 1.0
        assert skipped["lr"] == good["lr"]  # the schedule (lr / (s + 1)) does not advance on a skipped step
        assert good_again["skipped"] == 0.0 and good_again["moved"] > 0 and good_again["lr"] < good["lr"]
        assert skipped_again["skipped"] == 1.0 and skipped_again["skipped_steps"] == 2.0
        assert "2 consecutive steps (up to step 5) had a non-finite loss" in stopped["raised"]
        assert "(3 in all)" in stopped["raised"]
