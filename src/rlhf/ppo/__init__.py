"""The PPO engine: math (core), rollouts and models (rollout), the training loop (trainer)."""
