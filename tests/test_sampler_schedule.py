"""Reveal schedules against docs/sampler.md's numbers and against Dream's torch arithmetic."""

import numpy as np
import pytest
import torch

from dcjax.diffusion import schedule


def torch_dream_counts(num_masked_per_row, steps, eps=1e-3):
  """Dream's count per step, computed the way its torch code does (float32 tensors)."""
  timesteps = torch.linspace(1, eps, steps + 1)
  masked = torch.tensor(num_masked_per_row, dtype=torch.int64)
  counts = []
  for i in range(steps):
    t, s = timesteps[i], timesteps[i + 1]
    num_mask_token = masked.sum() / masked.shape[0]
    k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
    counts.append(k)
    masked = masked - torch.clamp(masked, max=k)
  return counts


@pytest.mark.parametrize("steps", [1, 2, 7, 8, 31, 64, 127, 128, 255, 256, 512, 1000, 2048])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_timesteps_equal_torch_linspace(steps, eps):
  np.testing.assert_array_equal(schedule.dream_timesteps(steps, eps),
                                torch.linspace(1, eps, steps + 1).numpy())


def test_spec_counts_n256():
  # docs/sampler.md: N = steps = 256: 0 at step 0, then 1 per step, 2 at the last step.
  counts = schedule.dream_reveal_counts(256, 256)
  assert counts[0] == 0 and counts[-1] == 2 and (counts[1:-1] == 1).all()
  # N = 256, steps = 128: 1, then 2 per step, 3 at the last.
  counts = schedule.dream_reveal_counts(256, 128)
  assert counts[0] == 1 and counts[-1] == 3 and (counts[1:-1] == 2).all()
  assert counts.sum() == 256


@pytest.mark.parametrize("n,steps", [(16, 16), (64, 16), (100, 7), (256, 64), (512, 512),
                                     (1024, 2048), (37, 100)])
def test_counts_equal_torch_reference(n, steps):
  np.testing.assert_array_equal(schedule.dream_reveal_counts(n, steps),
                                torch_dream_counts([n], steps))


def test_batch_average_counts_equal_torch_reference():
  rows = [40, 33, 64, 1]
  counts = schedule.dream_reveal_counts(rows, 12)
  want = torch_dream_counts(rows, 12)
  np.testing.assert_array_equal(counts[:-1], want[:-1])
  # Dream's last step reveals int(average) and leaves masks in the fuller rows; dcjax
  # reveals every row's remainder (here the 64-row's).
  remaining = np.asarray(rows)
  for k in counts[:-1]:
    remaining = remaining - np.minimum(remaining, k)
  assert want[-1] < counts[-1] == remaining.max()


def test_transfer_probabilities_equal_torch():
  ts = torch.linspace(1, 1e-3, 17)
  expected = [(1 - ts[i + 1] / ts[i]).item() for i in range(15)] + [1.0]
  np.testing.assert_array_equal(schedule.transfer_probabilities(16),
                                np.asarray(expected, np.float32))


def test_block_counts_llada():
  np.testing.assert_array_equal(schedule.block_reveal_counts(32, 6), [6, 6, 5, 5, 5, 5])
  np.testing.assert_array_equal(schedule.block_reveal_counts(8, 8), [1] * 8)
  np.testing.assert_array_equal(schedule.block_reveal_counts(3, 5), [1, 1, 1, 0, 0])


def test_build_schedule_blocks_and_refresh():
  s = schedule.build_schedule(64, 8, block_length=16, cache_refresh_every=0)
  np.testing.assert_array_equal(s.block_of_step, [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(s.reveal_count, [8] * 8)
  np.testing.assert_array_equal(s.refresh, [1, 0] * 4)
  assert (s.transfer_prob[1::2] == 1).all()
  s = schedule.build_schedule(64, 12, block_length=32, cache_refresh_every=4)
  np.testing.assert_array_equal(s.refresh, [1, 0, 0, 0, 1, 0] * 2)


@pytest.mark.parametrize("kwargs,field", [(dict(block_length=10), "block_length"),
                                          (dict(block_length=16, steps=6), "steps")])
def test_build_schedule_errors_name_the_argument(kwargs, field):
  args = dict(max_new_tokens=64, steps=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    schedule.build_schedule(args.pop("max_new_tokens"), args.pop("steps"), **args)
