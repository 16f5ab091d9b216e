"""zssvd.io.vllm.check without vLLM: how two greedy runs are compared, and the thread binding."""
import pytest

from zssvd.io.vllm.check import compare, threads_bind


def test_equal_runs_compare_over_every_token():
    hf = [([5, 6, 7], [-0.1, -0.2, -0.3]), ([1, 2], [-1.0, -2.0])]
    got = [([5, 6, 7], [-0.1, -0.25, -0.3]), ([1, 2], [-1.0, -2.0])]
    result = compare(hf, got)
    assert result["same_tokens"] and result["first_difference"] is None
    assert result["max_logprob_diff"] == pytest.approx(0.05)


def test_parting_runs_count_only_the_tokens_both_chose():
    """At the step where the tokens part, the log-probabilities are of two different tokens: not counted."""
    hf = [([5, 6, 7], [-0.1, -0.2, -0.3]), ([1, 2, 3], [-1.0, -2.0, -3.0])]
    got = [([5, 6, 7], [-0.1, -0.2, -0.3]), ([1, 9, 9], [-1.001, -5.0, -6.0])]
    result = compare(hf, got)
    assert not result["same_tokens"] and result["first_difference"] == [1, 1]
    assert result["max_logprob_diff"] == pytest.approx(0.001)


def test_the_earliest_difference_is_reported():
    hf = [([1, 2, 3], [0.0] * 3), ([1, 2, 3], [0.0] * 3)]
    got = [([1, 2, 4], [0.0] * 3), ([4, 2, 3], [0.0] * 3)]
    assert compare(hf, got)["first_difference"] == [1, 0]


def test_runs_of_different_prompts_counts_are_refused():
    with pytest.raises(ValueError):
        compare([([1], [0.0])], [])


@pytest.mark.parametrize("tp, cores, expected", [(1, 2, "0-1"), (3, 2, "0|1|0"), (2, 4, "0-1|2-3")])
def test_threads_bind(tp, cores, expected):
    assert threads_bind(tp, cores) == expected
