"""programs.theorem41_report gathers the Theorem 4.1 summaries that experiments wrote."""

import json

from programs.theorem41_report import summaries


def test_gathers_measured_summaries_and_skips_the_rest(tmp_path):
    measured = {"measured": 5, "conversations": 2, "delta": 1.0, "median_ratio": 0.9, "share_below_1": 0.6,
                "share_below_1_ci": [0.2, 1.0], "mean_log_ratio": -0.1, "mean_log_ratio_ci": [-0.3, 0.1]}
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"protocol": "hint", "theorem_4_1": measured, "machine": {"date": "d"}}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"protocol": "answer", "theorem_4_1": {"measured": 0}}))
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"benchmark": "no theorem here"}))
    (row,) = summaries([a, b, c])
    assert row["results"] == "a.json" and row["protocol"] == "hint" and row["turns"] == 5
    assert row["share ratio < 1"] == "0.60 [0.20, 1.00]" and row["mean log ratio"] == "-0.100 [-0.300, 0.100]"
    assert row["summary"] == measured
