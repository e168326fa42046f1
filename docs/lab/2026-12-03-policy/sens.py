import numpy as np
from airlora.config import RunConfig
from airlora.bandit import paper_bandit, share_of_gap, _knapsack
b = paper_bandit(RunConfig(), 0.1)
M, R = len(b.keys), 8
rng = np.random.default_rng(0)
def decide(gains, s):
    bud = b.budgets[s]
    val = gains - b.reward_lambda * bud.bits_per_param / (bud.capacity_bps * bud.t_max_s) * np.arange(R + 1)[None] * bud.costs[:, None]
    room = bud.room(dict.fromkeys(b.keys, 0))
    r = np.argmax(val, 1) if int(bud.costs.sum()) * R <= room else _knapsack(val, bud.costs, room)
    return dict(zip(b.keys, map(int, r)))
for eps in (0.0005, 0.001, 0.002, 0.003, 0.005):
    shares = []
    for rep in range(3):
        noise = eps * rng.standard_normal((M, R + 1)); noise[:, 0] = 0
        g = b.gains + noise
        per = {s: b.expected_reward(s, *b.execute(s, decide(g, s))) for s in b.snr_values}
        shares.append(share_of_gap(b, per))
    print(eps, np.round(shares, 3))
