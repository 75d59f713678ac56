"""Pytree assertions for tests: same structure, at least one leaf, then leaf by leaf.

`zip(jax.tree.leaves(a), jax.tree.leaves(b))` stops at the shorter tree, so an empty or
truncated tree compares equal to anything; these helpers check the structure first and name
the leaf (its key path) that differs.
"""

from __future__ import annotations

import jax
import numpy as np


def _paired_leaves(actual, expected):
  actual_def, expected_def = jax.tree.structure(actual), jax.tree.structure(expected)
  assert actual_def == expected_def, (
      f"tree structures differ:\n  actual:   {actual_def}\n  expected: {expected_def}")
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(actual)
  assert paths_and_leaves, "trees are empty: nothing to compare"
  for (path, a), b in zip(paths_and_leaves, jax.tree.leaves(expected), strict=True):
    yield jax.tree_util.keystr(path) or "<root>", np.asarray(a), np.asarray(b)


def _check_shape_and_dtype(name, a, b, check_dtype):
  assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
  if check_dtype:
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"


def assert_trees_equal(actual, expected, *, check_dtype: bool = True) -> int:
  """Same structure, non-empty, every leaf bit-equal (shape and dtype too). Returns the leaf count."""
  count = 0
  for name, a, b in _paired_leaves(actual, expected):
    _check_shape_and_dtype(name, a, b, check_dtype)
    np.testing.assert_array_equal(a, b, err_msg=name)
    count += 1
  return count


def assert_trees_close(actual, expected, *, rtol: float, atol: float,
                       check_dtype: bool = True) -> int:
  """Same structure, non-empty, every leaf within `atol + rtol * |expected|`. Returns the count."""
  count = 0
  for name, a, b in _paired_leaves(actual, expected):
    _check_shape_and_dtype(name, a, b, check_dtype)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
    count += 1
  return count
