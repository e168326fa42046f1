"""The hierarchical rank policy (paper §IV): a PPO coarse agent, a conditional diffusion refiner and a critic.

Submodules:
- ``hierarchical``: ``RankPolicy``, one decision and its learning (PPO proposes, the refiner refines, the critic
  chooses), and ``load_policy_file`` for a saved policy.pt;
- ``config``: ``PPOConfig``, ``DiffusionConfig``, ``PretrainConfig``, ``PolicyConfig``;
- ``ppo``: GAE, the Gaussian actor-critic, clipped PPO;
- ``diffusion``: ``DiffusionRefiner`` (guided DDIM over normalised ranks) and the rank coding;
- ``denoisers``: the MLP and 1-D U-Net noise networks;
- ``critic``: ``AdditiveCritic`` and ``MLPCritic``, what a rank vector is worth in a state;
- ``threads``: one-thread settings for the small networks;
- ``bench``: times one decision (``python -m airlora.policy.bench``).

Nothing is imported here, so reading a config does not load diffusers.
"""
