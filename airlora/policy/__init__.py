"""The hierarchical rank policy (paper §IV): a PPO coarse agent and a conditional diffusion refiner.

Submodules: ``config`` (PPOConfig, DiffusionConfig, PolicyConfig), ``ppo`` (GAE, actor-critic, PPO),
``denoisers`` (MLP and 1-D U-Net noise networks), ``diffusion`` (DiffusionRefiner, Critic, rank coding).
Nothing is imported here, so reading a config does not load diffusers.
"""
