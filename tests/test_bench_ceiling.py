"""The `ceiling` and `width` parts of programs.bench_sessions: FLOPs counted, not guessed; padding measured."""

import pytest

from programs.bench_sessions import bench_ceiling


def test_the_ceiling_counts_the_flops_of_each_pass_and_relates_them_to_the_peak(tiny_policy):
    result = bench_ceiling(tiny_policy, batches=(1, 3))
    matmul, *passes = result["rows"]
    assert matmul["GFLOP"] == pytest.approx(2 * 2048**3 / 1e9)  # a matmul of two n x n matrices: 2 n^3
    by_key = {(r["pass"], r["rows"]): r for r in passes}
    for label in ("forward", "forward + backward"):
        one, three = by_key[(label, 1)], by_key[(label, 3)]
        assert three["tokens"] == 3 * one["tokens"]
        assert three["GFLOP"] == pytest.approx(3 * one["GFLOP"])  # the same arithmetic, three times
        assert one["share of peak"] == pytest.approx(one["GFLOP/s"] / result["peak_gflops"])
    # The backward pass adds arithmetic to the forward's (the activations' gradients at least).
    assert by_key[("forward + backward", 1)]["GFLOP"] > by_key[("forward", 1)]["GFLOP"]
    assert result["most_batching_can_gain"]["forward, 1 row"] == pytest.approx(1 / by_key[("forward", 1)]["share of peak"])


def test_a_row_scored_beside_a_longer_row_keeps_its_log_prob_and_its_gradient_within_float_rounding(tiny_policy):
    from programs.bench_sessions import bench_score_width

    result = bench_score_width(tiny_policy, pairs=2)
    assert len(result["rows"]) == 2
    assert all(r["width beside"] > r["width alone"] for r in result["rows"])  # really a wider pass
    # Right padding hides the padding from every real token: equal up to float rounding (bit for bit or not,
    # depending on the kernels; what the part is there to measure).
    assert all(abs(r["log-prob difference"]) < 1e-4 for r in result["rows"])
    assert 0 <= result["max_relative_grad_difference"] < 1e-5
