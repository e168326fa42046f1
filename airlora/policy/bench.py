"""Time one rank decision: PPO act, guided DDIM refinement, decoding. ``python -m airlora.policy.bench --help``.

The state is the paper's {SNR, W, H, ρ} plus the current ranks, so S = 5 + D with D = 6L (HEAD_FEATURES = 5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from airlora.policy.config import DiffusionConfig, PPOConfig
from airlora.policy.diffusion import DiffusionRefiner, decode_ranks, make_denoiser
from airlora.policy.ppo import PPO
from airlora.state import HEAD_FEATURES


def time_decision(layers: int = 6, threads: int = 1, steps: int = 50, denoiser: str = "mlp",
                  guidance_scale: float = 1.5, coarse_dim: int | None = None, calls: int = 200,
                  r_max: int = 8, seed: int = 0) -> dict[str, float]:
    """Median wall and CPU milliseconds of `calls` batch-1 decisions after a warm-up, with `threads` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        action_dim = 6 * layers
        state_dim = HEAD_FEATURES + action_dim
        ppo = PPO(state_dim, action_dim, PPOConfig(coarse_dim=coarse_dim))
        config = DiffusionConfig(denoiser=denoiser, inference_steps=steps, guidance_scale=guidance_scale)
        cond_dim = state_dim + ppo.coarse_dim
        refiner = DiffusionRefiner(make_denoiser(config, action_dim, cond_dim), config, action_dim)
        state = torch.randn(1, state_dim)
        generator = torch.Generator().manual_seed(seed)

        def decide() -> torch.Tensor:
            coarse_action, _, _ = ppo.act(state, generator)
            return decode_ranks(refiner.sample(torch.cat([state, coarse_action], dim=-1), generator), r_max)

        for _ in range(max(5, calls // 10)):
            decide()
        wall, cpu = [], []
        for _ in range(calls):
            w0, c0 = time.perf_counter(), time.process_time()
            decide()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        return {"median_ms": 1e3 * statistics.median(wall), "cpu_median_ms": 1e3 * statistics.median(cpu),
                "p90_ms": 1e3 * statistics.quantiles(wall, n=10)[-1], "action_dim": action_dim, "steps": steps,
                "threads": threads}
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    """Print the decision time for the given settings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=6, help="transformer layers L; D = 6L")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="DDIM inference steps")
    parser.add_argument("--denoiser", choices=["mlp", "unet"], default="mlp")
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    result = time_decision(args.layers, args.threads, args.steps, args.denoiser, args.guidance_scale,
                           calls=args.calls)
    print(f"{args.denoiser} D={result['action_dim']} steps={args.steps} w={args.guidance_scale} "
          f"threads={args.threads}: median {result['median_ms']:.2f} ms (cpu {result['cpu_median_ms']:.2f} ms, "
          f"p90 {result['p90_ms']:.2f} ms) over {args.calls} decisions")


if __name__ == "__main__":
    main()
