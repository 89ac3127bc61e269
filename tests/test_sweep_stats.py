"""The sweep's statistics (report/stats.py) against values worked out by hand: Student-t tail and
quantile from closed forms and printed tables, the paired and Welch gaps, and the table text that
carries them (report/sweep.py)."""

import math

import pytest

from visual_rft.report import stats
from visual_rft.report.sweep import cell_stats, gap_markdown, markdown, verdict


def _p_df1(t):  # Cauchy: F(t) = 1/2 + atan(t) / pi
    return 1 - 2 * math.atan(abs(t)) / math.pi


def _p_df2(t):  # F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    return 1 - abs(t) / math.sqrt(2 + t * t)


def _p_df3(t):  # F(t) = 1/2 + (u / (1 + u^2) + atan(u)) / pi, u = t / sqrt(3)
    u = abs(t) / math.sqrt(3)
    return 1 - 2 * (math.atan(u) + u / (1 + u * u)) / math.pi


def _p_df4(t):  # I_x(2, 1/2) with x = 4 / (4 + t^2): 1 - 3y/2 + y^3/2, y = |t| / sqrt(4 + t^2)
    y = abs(t) / math.sqrt(4 + t * t)
    return 1 - 1.5 * y + 0.5 * y ** 3


@pytest.mark.parametrize("df, closed_form", [(1, _p_df1), (2, _p_df2), (3, _p_df3), (4, _p_df4)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.3, 4.5, -2.3, 25.0])
def test_two_sided_p_matches_the_closed_forms(t, df, closed_form):
    assert stats.t_two_sided_p(t, df) == pytest.approx(closed_form(t), abs=1e-12)


def test_the_issues_example_two_sided_p_for_t_2_3_on_3_df():
    assert stats.t_two_sided_p(2.3, 3) == pytest.approx(0.10499, abs=1e-5)
    assert stats.t_cdf(2.3, 3) == pytest.approx(1 - 0.10499 / 2, abs=1e-5)
    assert stats.t_cdf(-2.3, 3) == pytest.approx(0.10499 / 2, abs=1e-5)


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                       (30, 2.042), (1000, 1.962)])
def test_quantile_matches_the_printed_t_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


def test_quantile_matches_the_closed_forms_and_is_antisymmetric():
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    # df = 2: t_q = (2q - 1) sqrt(2 / (4 q (1 - q)))
    assert stats.t_quantile(0.9, 2) == pytest.approx(0.8 * math.sqrt(2 / (4 * 0.9 * 0.1)), rel=1e-10)
    assert stats.t_quantile(0.1, 5) == pytest.approx(-stats.t_quantile(0.9, 5), rel=1e-12)


def test_agrees_with_scipy_over_a_grid_of_t_and_fractional_df():
    scipy_stats = pytest.importorskip("scipy.stats")  # installed with scikit-learn (dev); not a dependency
    for df in (1, 1.7, 2.635, 5, 12.3, 60, 400):
        for t in (0.05, 0.7, 1.9, 3.1, 8.0):
            assert stats.t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9)
        for q in (0.6, 0.95, 0.975, 0.999):
            assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="df > 0"):
        stats.t_two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="q=1"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="equally long"):
        stats.paired_gap([1.0, 2.0], [1.0])


def test_mean_interval_by_hand():
    # values 0.90, 0.92, 0.91: mean 0.91, sd 0.01, se 0.01 / sqrt(3); t_{0.975, 2} = 4.302653
    cell = cell_stats([0.90, 0.92, 0.91])
    half = 4.302653 * 0.01 / math.sqrt(3)  # 0.024841
    assert cell["ci95"] == pytest.approx([0.91 - half, 0.91 + half], abs=1e-6)
    assert cell_stats([0.5])["ci95"] == [None, None]  # one seed: no spread, no interval


def test_paired_gap_by_hand():
    # differences 0.02, 0.01, 0.03: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3 on 2 df
    gap = stats.paired_gap([0.90, 0.92, 0.91], [0.92, 0.93, 0.94])
    t = 2 * math.sqrt(3)
    assert gap["test"] == "paired" and gap["df"] == 2 and gap["gap"] == pytest.approx(0.02)
    assert gap["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)  # 0.07418
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (gap["low"], gap["high"]) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-6)


def test_welch_gap_by_hand():
    # the issue's cell (k=4, 1500-step base): SFT 0.919 sd 0.008, RFT 0.932 sd 0.006, n = 3 each:
    # se^2 = (0.008^2 + 0.006^2) / 3 = 3.333e-5, t = 0.013 / 0.005774 = 2.252,
    # df = (3.333e-5)^2 / ((2.133e-5^2 + 1.2e-5^2) / 2) = 3.709
    gap = stats.welch_gap(0.919, 0.008, 3, 0.932, 0.006, 3)
    assert gap["test"] == "welch" and gap["gap"] == pytest.approx(0.013)
    assert gap["df"] == pytest.approx(3.709, abs=1e-3)
    assert gap["p"] == pytest.approx(stats.t_two_sided_p(0.013 / math.sqrt(1e-4 / 3), 3.709199), rel=1e-5)
    assert 0.09 < gap["p"] < 0.1  # the issue's "p ~ 0.1"
    # equal variances and n = 2 each: df = 2 exactly; means 1 and 4, variances 2: t = 3 / sqrt 2
    equal = stats.welch_gap(1.0, math.sqrt(2), 2, 4.0, math.sqrt(2), 2)
    t = 3 / math.sqrt(2)
    assert equal["df"] == pytest.approx(2.0) and equal["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # equal sds and n = 3: df = 4, t = 0.02 / sqrt(2e-4 / 3) = sqrt 6
    four = stats.welch_gap(0.91, 0.01, 3, 0.93, 0.01, 3)
    assert four["df"] == pytest.approx(4.0) and four["p"] == pytest.approx(_p_df4(math.sqrt(6)), abs=1e-9)


def test_cell_gap_pairs_matching_seed_lists_and_falls_back_to_welch():
    sft, rft = cell_stats([0.90, 0.92, 0.91]), cell_stats([0.92, 0.93, 0.94])
    assert stats.cell_gap({**sft, "seeds": [0, 1, 2]}, {**rft, "seeds": [0, 1, 2]})["test"] == "paired"
    welch = stats.cell_gap({**sft, "seeds": [0, 1, 2]}, {**rft, "seeds": [0, 1, 3]})
    assert welch["test"] == "welch" and welch["df"] == pytest.approx(4.0)
    summary_only = {"mean": 0.91, "std": 0.01, "n": 3}  # a table that kept no per-seed values
    assert stats.cell_gap(summary_only, {"mean": 0.93, "std": 0.01, "n": 3})["p"] == pytest.approx(welch["p"])


def test_equal_differences_give_a_zero_width_interval_and_one_seed_none():
    same = stats.paired_gap([0.1, 0.2], [0.3, 0.4])
    assert (same["low"], same["high"], same["p"]) == pytest.approx((0.2, 0.2, 0.0))
    one = stats.paired_gap([0.1], [0.3])
    assert one["gap"] == pytest.approx(0.2) and one["p"] is None and one["low"] is None


def _summary():
    sft = {**cell_stats([0.90, 0.92, 0.91]), "k": 1, "method": "sft", "base_steps": None, "seeds": [0, 1, 2]}
    rft = {**cell_stats([0.92, 0.93, 0.94]), "k": 1, "method": "rft", "base_steps": None, "seeds": [0, 1, 2]}
    return {"metric": "accuracy", "methods": ["sft", "rft"], "ks": [1], "base": 0.9,
            "bases": [{"base_steps": None, "value": 0.9}], "cells": [sft, rft]}


def test_table_text_carries_the_interval_p_and_what_it_says():
    summary = _summary()
    text = markdown(summary)
    assert "| SFT accuracy mean [95% CI] (sd, n) | RFT accuracy mean [95% CI] (sd, n) | RFT − SFT |" in text
    # CI half-width 4.302653 x 0.01 / sqrt 3 = 0.0248; gap 0.02 [-0.005, +0.045], p = 0.074 (by hand above)
    assert ("| 1 | 0.900 | 0.910 [0.885, 0.935] (sd 0.010, n=3) | 0.930 [0.905, 0.955] (sd 0.010, n=3) "
            "| +0.020 [-0.005, +0.045] p=0.074 (paired): no clear difference |") in text
    clear = verdict(cell_stats([0.90, 0.91, 0.92]) | {"seeds": [0, 1, 2]},
                    cell_stats([0.80, 0.80, 0.83]) | {"seeds": [0, 1, 2]})
    # differences -0.10, -0.11, -0.09: mean -0.10, sd 0.01, t = -10 sqrt 3 = -17.32 on 2 df:
    # p = 1 - 17.32 / sqrt(2 + 300) = 0.0033
    assert clear == "-0.100 [-0.125, -0.075] p=0.003 (paired): SFT ahead"
    one_seed = verdict(cell_stats([0.5]) | {"seeds": [0]}, cell_stats([0.6]) | {"seeds": [0]})
    assert one_seed == "+0.100 (one seed: no interval)"


def test_gap_table_by_base_carries_intervals():
    summary = _summary()
    for cell in summary["cells"]:
        cell["base_steps"] = 300
    summary["bases"] = [{"base_steps": 300, "value": 0.9}]
    assert "| 300 steps (0.900) | RFT − SFT | +0.020 [-0.005, +0.045] p=0.074 |" in gap_markdown(summary)


def test_no_thinking_is_also_compared_with_thinking_rft():
    summary = _summary()
    nothink = {**cell_stats([0.91, 0.95, 0.93]), "k": 1, "method": "rft_nothink", "base_steps": None,
               "seeds": [0, 1, 2]}
    summary["cells"].append(nothink)
    summary["methods"] = ["sft", "rft", "rft_nothink"]
    text = markdown(summary)
    assert "| RFT − SFT | RFT no-think − SFT | RFT no-think − RFT |" in text
    # no-think - RFT per seed: -0.01, +0.02, -0.01: mean 0, so t = 0 and p = 1
    assert text.rstrip().endswith("| +0.000 [-0.043, +0.043] p=1.000 (paired): no clear difference |")
