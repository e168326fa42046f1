"""A free piecewise-linear rank curve per module (36 x 9 weights), ridge + random-walk + curvature priors, closed form.

python docs/lab/2026-12-03-policy/critic_test.py SIGMA SPREAD SMOOTH CURVATURE   (e.g. 0.1 3 1 300)
"""
import sys

import numpy as np

from airlora.bandit import _knapsack, paper_bandit, share_of_gap
from airlora.config import RunConfig

sigma, spread, smooth, curv = (float(a) for a in sys.argv[1:5])
b = paper_bandit(RunConfig(), sigma)
M, R = len(b.keys), 8
G = R + 1
rng = np.random.default_rng(0)
d1, d2 = np.diff(np.eye(G), axis=0), np.diff(np.eye(G), n=2, axis=0)
block = 1e-2 * np.eye(G) + smooth * d1.T @ d1 + curv * d2.T @ d2
F = 6 + M * G
prior = np.zeros((F, F))
prior[:6, :6] = 1e-2 * np.eye(6)
for m in range(M):
    prior[6 + m * G: 6 + (m + 1) * G, 6 + m * G: 6 + (m + 1) * G] = block
gram, moment = np.zeros((F, F)), np.zeros(F)


def decide(w, s):
    bud = b.budgets[s]
    val = w - w[:, :1] - b.reward_lambda * bud.bits_per_param / (bud.capacity_bps * bud.t_max_s) * np.arange(G)[None] \
        * bud.costs[:, None]
    room = bud.room(dict.fromkeys(b.keys, 0))
    r = np.argmax(val, 1) if int(bud.costs.sum()) * R <= room else _knapsack(val, bud.costs, room)
    return dict(zip(b.keys, map(int, r)))


for step in range(15000):
    s = b.snr_values[rng.integers(5)]
    u = b.uniform(s)[b.keys[0]]
    ex = b.execute(s, {k: int(np.clip(np.round(u + spread * rng.standard_normal()), 0, R)) for k in b.keys})[0]
    r = np.array([ex[k] for k in b.keys], dtype=float)
    phi = np.r_[1, (s + 20) / 60, rng.uniform(.6, .9), rng.uniform(0, .1), 0.75, step / 15000,
                np.clip(1 - np.abs(r[:, None] - np.arange(G)[None]), 0, None).ravel()]
    y = -(b.expected_loss(ex) + sigma * rng.standard_normal())
    gram += np.outer(phi, phi)
    moment += phi * y
    if step + 1 in (1500, 4500, 15000):
        w = np.linalg.solve(prior + gram, moment)[6:].reshape(M, G)
        per = {s: b.expected_reward(s, *b.execute(s, decide(w, s))) for s in b.snr_values}
        print((step + 1) // 15, "share", round(share_of_gap(b, per), 3), flush=True)
