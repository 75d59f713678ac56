"""Reinforcement learning (coupled-GRPO). The rewards live in dcjax.rl.rewards."""
