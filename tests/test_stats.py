"""The evaluation statistics (epo_cli/stats.py) on hand-computed cases."""

import pytest

from epo_cli.stats import EpisodeOutcome, compare_paired, sign_test_p, t_interval, wilson_interval


def test_wilson_interval_hand_values():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.4899, abs=1e-4)
    assert wilson_interval(16, 16)[1] == 1.0


def test_sign_test_p_by_hand():
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0


def test_paired_comparison_pairs_by_task_and_seed():
    def outcomes(wins):
        return [EpisodeOutcome(f"g{i // 2}", i % 2, won, float(won), 4, 0) for i, won in enumerate(wins)]

    before = outcomes([False, False, True, False, False, False])
    after = outcomes([True, True, True, False, True, True])
    extra = [EpisodeOutcome("unpaired", 0, True, 1.0, 4, 0)]
    c = compare_paired(before, after + extra)
    assert (c.pairs, c.before, c.after) == (6, pytest.approx(1 / 6), pytest.approx(5 / 6))
    assert (c.tasks_worse, c.tasks_better) == (0, 2) and c.sign_test_p == pytest.approx(2 / 4)
    low, high = c.bootstrap_interval
    assert 0 <= low <= c.difference <= high <= 1 and low < high
    with pytest.raises(ValueError, match="no episode in common"):
        compare_paired(before, extra)


def test_paired_comparison_of_scores_works_over_task_sums():
    def outcomes(scores):
        return [EpisodeOutcome(f"g{i // 2}", i % 2, s == 1.0, s, 4, 0) for i, s in enumerate(scores)]

    before, after = outcomes([0.5, 0.5, 0.0, 1.0]), outcomes([0.75, 0.5, 0.0, 0.5])
    c = compare_paired(before, after, "score")
    assert (c.before, c.after, c.difference) == (0.5, 0.4375, -0.0625)
    assert (c.tasks_worse, c.tasks_better, c.sign_test_p) == (1, 1, 1.0)  # g0 +0.25, g1 -0.5
    success = compare_paired(before, after)
    assert (success.before, success.after, success.tasks_worse, success.tasks_better) == (0.25, 0.0, 1, 0)
    same = outcomes([0.67 + 0.17, 0.0, 0.17, 0.67])
    swapped = outcomes([0.17 + 0.67, 0.0, 0.67, 0.17])  # equal sums up to float rounding
    assert compare_paired(same, swapped, "score").tasks_worse == compare_paired(same, swapped, "score").tasks_better == 0


def test_t_interval_over_seeds_by_hand():
    # mean 0.6, std 0.1, t(0.975, 2) = 4.302653: half-width 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert t_interval([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.351586, 0.848414), abs=1e-6)
    assert t_interval([0.0, 0.0, 0.3])[1] == 0.0  # clipped at 0
    assert t_interval([0.25]) == (0.25, 0.25, 0.25)
