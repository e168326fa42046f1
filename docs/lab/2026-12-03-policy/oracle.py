# best-case learner: ridge regression on the true features exp(-r/tau) per module, exploration around uniform
import numpy as np, sys
from airlora.config import RunConfig
from airlora.bandit import paper_bandit, share_of_gap, _knapsack
sigma = float(sys.argv[1]); spread = float(sys.argv[2])
b = paper_bandit(RunConfig(), sigma)
M, R = len(b.keys), 8
rng = np.random.default_rng(0)
X, Y = [], []
def decide(wh, s):
    bud = b.budgets[s]
    gains = wh[:, None] * (1 - np.exp(-np.arange(R + 1) / 2.0))[None]
    val = gains - b.reward_lambda * bud.bits_per_param / (bud.capacity_bps * bud.t_max_s) * np.arange(R + 1)[None] * bud.costs[:, None]
    room = bud.room(dict.fromkeys(b.keys, 0))
    r = np.argmax(val, 1) if int(bud.costs.sum()) * R <= room else _knapsack(val, bud.costs, room)
    return dict(zip(b.keys, map(int, r)))
for step in range(15000):
    s = b.snr_values[rng.integers(5)]
    u = b.uniform(s)[b.keys[0]]
    prop = {k: int(np.clip(np.round(u + spread * rng.standard_normal()), 0, R)) for k in b.keys}
    ex = b.execute(s, prop)[0]
    r = np.array([ex[k] for k in b.keys])
    X.append(np.r_[1.0, np.exp(-r / 2.0)]); Y.append(-(b.expected_loss(ex) + sigma * rng.standard_normal()))
    if step + 1 in (1500, 4500, 15000):
        A = np.array(X); y = np.array(Y)
        coef = np.linalg.solve(A.T @ A + 1e-3 * np.eye(M + 1), A.T @ y)
        wh = -coef[1:]
        per = {s: b.expected_reward(s, *b.execute(s, decide(np.clip(wh, 0, None), s))) for s in b.snr_values}
        print((step + 1) // 15, "share", round(share_of_gap(b, per), 3), "w corr", round(np.corrcoef(wh, b.gains[:, -1] / (1 - np.exp(-4)))[0, 1], 3))
