"""CI's slice of the differential fuzzer: a fixed set of seeds through every pipeline, no crash and no mismatch.

The seeds cover dilated, grouped, depthwise, 'same' and asymmetric-padded convs, max and adaptive max pools,
residual, concat and squeeze-excite blocks, and an LSTM (``python -m tests.fuzz`` runs any number)."""

from __future__ import annotations

import pytest

from tests.fuzz.run import PIPELINES, fuzz

pytestmark = pytest.mark.tvm

CI_SEEDS = (1, 3, 6, 14)


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_fuzz_seed_has_no_crash_and_no_mismatch(seed, tmp_path):
    summary = fuzz([seed], list(PIPELINES), tmp_path)
    assert summary.count("crash") + summary.count("mismatch") == 0, summary.text()
    assert summary.count("ok") >= len(PIPELINES) - 1, summary.text()  # at most one clean refusal
