"""The tree assertions fail where zip over leaves would pass: empty, truncated, renamed trees."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.trees import assert_trees_close, assert_trees_equal

TREE = {"a": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
        "b": [np.float32(1.5), np.ones(2, np.int32)]}


def test_equal_and_close_trees_pass_and_count_leaves():
  same = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)},
          "b": [jnp.float32(1.5), jnp.ones(2, jnp.int32)]}
  assert assert_trees_equal(same, TREE) == 3
  nudged = {"a": {"kernel": TREE["a"]["kernel"] + 1e-7}, "b": TREE["b"]}
  assert assert_trees_close(nudged, TREE, rtol=1e-6, atol=1e-6) == 3


@pytest.mark.parametrize("other,message", [
    ({}, "structures differ"),
    ({"a": TREE["a"]}, "structures differ"),                     # a truncated tree
    ({"a": {"bias": TREE["a"]["kernel"]}, "b": TREE["b"]}, "structures differ"),  # renamed leaf
    ({"a": {"kernel": TREE["a"]["kernel"][:1]}, "b": TREE["b"]}, "shape"),
    ({"a": {"kernel": TREE["a"]["kernel"].astype(np.float64)}, "b": TREE["b"]}, "dtype"),
])
def test_mismatched_trees_fail(other, message):
  for check in (assert_trees_equal, lambda x, y: assert_trees_close(x, y, rtol=0.1, atol=0.1)):
    with pytest.raises(AssertionError, match=message):
      check(other, TREE)


def test_empty_trees_fail():
  with pytest.raises(AssertionError, match="empty"):
    assert_trees_equal({}, {})
  with pytest.raises(AssertionError, match="empty"):
    assert_trees_close([], [], rtol=1, atol=1)


def test_a_differing_leaf_is_named():
  other = {"a": {"kernel": TREE["a"]["kernel"]}, "b": [np.float32(1.75), TREE["b"][1]]}
  with pytest.raises(AssertionError, match=r"\['b'\]\[0\]"):
    assert_trees_equal(other, TREE)
  with pytest.raises(AssertionError, match=r"\['b'\]\[0\]"):
    assert_trees_close(other, TREE, rtol=1e-3, atol=0)
  assert_trees_close(other, TREE, rtol=0.2, atol=0)
