"""Reinforcement learning (coupled-GRPO, docs/grpo.md). The rewards live in dcjax.rl.rewards.

Modules: grpo_config (config sections), prompts / synthetic (tasks, prompts, iterator),
rollout (G completions from the sampler), reward_worker (rewards on a thread), advantages,
logprobs (coupled / decoupled / full-mask estimators), loss (PPO clip + k3 KL), learner
(state, AdamW, jitted steps), iteration (one rollout batch), warm_start (SFT for the demo),
loop (mode "grpo").
"""
