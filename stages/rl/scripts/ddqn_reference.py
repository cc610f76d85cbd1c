"""PyTorch reference for the `ddqn` benchmark (.ci/bench-ddqn-vs-pytorch.sh).

Does the work of the TDQN authors' published training loop (Theate & Ernst 2021,
github.com/ThibautTheate/An-Application-of-Deep-Reinforcement-Learning-to-Algorithmic-Trading:
TDQN.py, tradingEnv.py) step for step, written here from its description; no code of that
repository is copied. Per environment step, as there:

* epsilon-greedy with sticky actions; a greedy choice is a 1-row forward pass in eval mode,
* a pandas DataFrame environment: positions, cash, holdings, money and returns are read and
  written cell by cell for the chosen action, the other action is simulated from the same
  state (the TDQN trick), and both next states are sliced out of the frame as lists,
* the per-step feature computation (`processState`) in Python lists over the 30-day window,
* two transitions pushed into a `deque(maxlen=100000)` of (state list, action, reward, next
  state list, done) tuples,
* one learning step: `random.sample` of 32, tensors built from the lists, policy forward
  (train mode) on states and next states, target forward, Huber loss, Adam with L2,
  gradient-norm clipping, target copy every 1000 actions.

After every episode the greedy policy is run day by day over the whole train and test
splits, as the authors' `testing` (low-pass filtered copies, per-day processState, a forward
pass and two environment steps per day) and their Sharpe ratio is computed.

Network: 117 -> 4 x (Linear 512, BatchNorm1d, LeakyReLU, Dropout 0.2) -> Linear 2, Xavier.

Episode lengths come from the command line (`--steps`), so that both implementations train
on exactly as many environment steps; each episode starts `steps` days before the end of the
training data. Writes one JSON object to stdout (and to --out).
"""
import argparse
import collections
import copy
import json
import math
import random
import sys
import time

import numpy as np
import pandas as pd

# torch from the project venv (the bench venv has pandas/numpy, the project venv has torch).
for p in sys.argv:
    if p.startswith("--torch-site="):
        sys.path.append(p.split("=", 1)[1])
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

WINDOW = 30
GAMMA = 0.4
LR = 1e-4
TARGET_UPDATE = 1000
CAPACITY = 100_000
BATCH = 32
HIDDEN = 512
DROPOUT = 0.2
EPS_START, EPS_END, EPS_DECAY = 1.0, 0.01, 10_000
STICKY = 0.1
FILTER_ORDER = 5
GRAD_CLIP = 1.0
REWARD_CLIP = 1.0
L2 = 1e-6
MONEY = 100_000.0
COSTS = 0.001


def load(path):
    df = pd.read_csv(path, header=0, index_col="Timestamp", parse_dates=True)
    df = df.replace(0.0, np.nan)
    df = df.interpolate(method="linear", limit=5, limit_area="inside").ffill().bfill().fillna(0)
    return df


class Env:
    """A trading environment over a DataFrame, updated cell by cell per step."""

    def __init__(self, data):
        self.data = data.copy()
        self.epsilon = 0.1
        self.cols = {c: self.data.columns.get_loc(c) for c in self.data.columns}
        self.reset()

    def _col(self, name):
        return self.data[name]

    def reset(self):
        d = self.data
        for c, v in (("Position", 0), ("Action", 0), ("Holdings", 0.0), ("Cash", MONEY),
                     ("Money", MONEY), ("Returns", 0.0)):
            d[c] = v
        self.cols = {c: d.columns.get_loc(c) for c in d.columns}
        self.t = WINDOW
        self.shares = 0
        self.done = 0
        self.state = self._state(self.t, 0)
        return self.state

    def _state(self, t, position):
        d = self.data
        return [d["Close"].iloc[t - WINDOW:t].tolist(), d["Low"].iloc[t - WINDOW:t].tolist(),
                d["High"].iloc[t - WINDOW:t].tolist(), d["Volume"].iloc[t - WINDOW:t].tolist(),
                [position]]

    def start_at(self, t):
        self.t = int(np.clip(t, WINDOW, len(self.data.index)))
        self.state = self._state(self.t, self._col("Position").iloc[self.t - 1])
        if self.t == self.data.shape[0]:
            self.done = 1

    def _get(self, c, i):
        return self._col(c).iloc[i]

    def _set(self, c, i, v):
        self.data.iat[i, self.cols[c]] = v

    def _lower_bound(self, cash, shares, price):
        delta = -cash - shares * price * (1 + self.epsilon) * (1 + COSTS)
        if delta < 0:
            return delta / (price * (2 * COSTS + (self.epsilon * (1 + COSTS))))
        return delta / (price * self.epsilon * (1 + COSTS))

    def _simulate(self, action, t, shares):
        """(position, cash, holdings, shares, custom_reward) of `action` at day t."""
        prev_pos = self._get("Position", t - 1)
        prev_cash = self._get("Cash", t - 1)
        close = self._get("Close", t)
        custom = False
        if action == 1:
            pos = 1
            if prev_pos == 1:
                cash = prev_cash
            elif prev_pos == 0:
                shares = math.floor(prev_cash / (close * (1 + COSTS)))
                cash = prev_cash - shares * close * (1 + COSTS)
            else:
                cash = prev_cash - shares * close * (1 + COSTS)
                shares = math.floor(cash / (close * (1 + COSTS)))
                cash = cash - shares * close * (1 + COSTS)
            holdings = shares * close
        else:
            pos = -1
            if prev_pos == -1:
                lb = self._lower_bound(prev_cash, -shares, self._get("Close", t - 1))
                if lb <= 0:
                    cash = prev_cash
                else:
                    buy = min(math.floor(lb), shares)
                    shares -= buy
                    cash = prev_cash - buy * close * (1 + COSTS)
                    custom = True
            elif prev_pos == 0:
                shares = math.floor(prev_cash / (close * (1 + COSTS)))
                cash = prev_cash + shares * close * (1 - COSTS)
            else:
                cash = prev_cash + shares * close * (1 - COSTS)
                shares = math.floor(cash / (close * (1 + COSTS)))
                cash = cash + shares * close * (1 - COSTS)
            holdings = -shares * close
        return pos, cash, holdings, shares, custom

    def step(self, action):
        t = self.t
        shares_before = self.shares
        pos, cash, holdings, shares, custom = self._simulate(action, t, shares_before)
        if pos != self._get("Position", t - 1):
            self._set("Action", t, pos)
        self.shares = shares
        self._set("Position", t, pos)
        self._set("Cash", t, cash)
        self._set("Holdings", t, holdings)
        money = self._get("Holdings", t) + self._get("Cash", t)
        self._set("Money", t, money)
        prev_money = self._get("Money", t - 1)
        self._set("Returns", t, (money - prev_money) / prev_money)
        if custom:
            reward = (self._get("Close", t - 1) - self._get("Close", t)) / self._get("Close", t - 1)
        else:
            reward = self._get("Returns", t)
        self.t += 1
        self.state = self._state(self.t, self._get("Position", self.t - 1))
        if self.t == self.data.shape[0]:
            self.done = 1
        # The other action from the same state (the TDQN trick).
        other = int(not bool(action))
        opos, ocash, oholdings, _, ocustom = self._simulate(other, t, shares_before)
        omoney = oholdings + ocash
        if ocustom:
            oreward = (self._get("Close", t - 1) - self._get("Close", t)) / self._get("Close", t - 1)
        else:
            oreward = (omoney - self._get("Money", t - 1)) / self._get("Money", t - 1)
        info = {"State": self._state(self.t, opos), "Reward": oreward, "Done": self.done}
        return self.state, reward, self.done, info


def low_pass(env, order=FILTER_ORDER):
    e = copy.deepcopy(env)
    for c in ("Close", "Low", "High", "Volume"):
        f = env.data[c].rolling(window=order).mean()
        f.iloc[:order] = env.data[c].iloc[:order]
        e.data[c] = f
    e.data["Open"] = e.data["Close"].shift(1)
    e.data.iat[0, e.cols["Open"]] = env.data["Open"].iloc[0]
    return e


def coefficients(env):
    d = env.data
    close, low, high, vol = (d[c].tolist() for c in ("Close", "Low", "High", "Volume"))
    rets = [abs((close[i] - close[i - 1]) / close[i - 1]) for i in range(1, len(close))]
    ranges = [abs(high[i] - low[i]) for i in range(len(low))]
    return [(0, np.max(rets)), (0, np.max(ranges)), (0, 1), (np.min(vol), np.max(vol))]


def process_state(state, coef):
    close, low, high, vol = state[0], state[1], state[2], state[3]
    n = len(close)
    rets = [(close[i] - close[i - 1]) / close[i - 1] for i in range(1, n)]
    out = []
    lo, hi = coef[0]
    out.append([(x - lo) / (hi - lo) for x in rets] if lo != hi else [0 for _ in rets])
    rng = [abs(high[i] - low[i]) for i in range(1, n)]
    lo, hi = coef[1]
    out.append([(x - lo) / (hi - lo) for x in rng] if lo != hi else [0 for _ in rng])
    pos = []
    for i in range(1, n):
        r = abs(high[i] - low[i])
        pos.append(abs(close[i] - low[i]) / r if r != 0 else 0.5)
    lo, hi = coef[2]
    out.append([(x - lo) / (hi - lo) for x in pos] if lo != hi else [0.5 for _ in pos])
    v = [vol[i] for i in range(1, n)]
    lo, hi = coef[3]
    out.append([(x - lo) / (hi - lo) for x in v] if lo != hi else [0 for _ in v])
    out.append(state[4])
    return [x for part in out for x in part]


class QNet(nn.Module):
    def __init__(self, inputs, outputs=2):
        super().__init__()
        sizes = [inputs] + [HIDDEN] * 4
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.bn = nn.ModuleList(nn.BatchNorm1d(HIDDEN) for _ in range(4))
        self.drop = nn.ModuleList(nn.Dropout(DROPOUT) for _ in range(4))
        self.out = nn.Linear(HIDDEN, outputs)
        for lin in list(self.fc) + [self.out]:
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x):
        for fc, bn, drop in zip(self.fc, self.bn, self.drop):
            x = drop(F.leaky_relu(bn(fc(x))))
        return self.out(x)


class Agent:
    def __init__(self, inputs):
        self.policy = QNet(inputs)
        self.target = QNet(inputs)
        self.target.load_state_dict(self.policy.state_dict())
        self.policy.eval()
        self.target.eval()
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=LR, weight_decay=L2)
        self.memory = collections.deque(maxlen=CAPACITY)
        self.iterations = 0
        self.learn_steps = 0

    def epsilon(self):
        return EPS_END + (EPS_START - EPS_END) * math.exp(-self.iterations / EPS_DECAY)

    def greedy(self, state):
        with torch.no_grad():
            q = self.policy(torch.tensor(state, dtype=torch.float).unsqueeze(0)).squeeze(0)
            _, a = q.max(0)
            return a.item(), q.numpy()

    def act(self, state, previous):
        if random.random() > self.epsilon():
            a = self.greedy(state)[0] if random.random() > STICKY else previous
        else:
            a = random.randrange(2)
        self.iterations += 1
        return a

    def learn(self):
        if len(self.memory) < BATCH:
            return
        self.policy.train()
        s, a, r, s2, d = zip(*random.sample(self.memory, BATCH))
        s = torch.tensor(s, dtype=torch.float)
        a = torch.tensor(a, dtype=torch.long)
        r = torch.tensor(r, dtype=torch.float)
        s2 = torch.tensor(s2, dtype=torch.float)
        d = torch.tensor(d, dtype=torch.float)
        q = self.policy(s).gather(1, a.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            next_a = torch.max(self.policy(s2), 1)[1]
            next_q = self.target(s2).gather(1, next_a.unsqueeze(1)).squeeze(1)
            expected = r + GAMMA * next_q * (1 - d)
        loss = F.smooth_l1_loss(q, expected)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), GRAD_CLIP)
        self.opt.step()
        self.learn_steps += 1
        if self.iterations % TARGET_UPDATE == 0:
            self.target.load_state_dict(self.policy.state_dict())
        self.policy.eval()


def train_episode(agent, env, steps):
    coef = coefficients(env)
    env.reset()
    env.start_at(len(env.data.index) - steps)
    state = process_state(env.state, coef)
    previous, done, n = 0, 0, 0
    while done == 0:
        action = agent.act(state, previous)
        nxt, reward, done, info = env.step(action)
        reward = float(np.clip(reward, -REWARD_CLIP, REWARD_CLIP))
        nxt = process_state(nxt, coef)
        agent.memory.append((state, action, reward, nxt, done))
        other_reward = float(np.clip(info["Reward"], -REWARD_CLIP, REWARD_CLIP))
        other_next = process_state(info["State"], coef)
        agent.memory.append((state, int(not bool(action)), other_reward, other_next, info["Done"]))
        agent.learn()
        state, previous = nxt, action
        n += 1
    return n


def sharpe(env):
    r = env.data["Returns"]
    m, s = r.mean(), r.std()
    return float(np.sqrt(252) * m / s) if m != 0 and s != 0 else 0.0


def testing(agent, train_env, test_env):
    smoothed = low_pass(test_env)
    coef = coefficients(low_pass(train_env))
    state = process_state(smoothed.reset(), coef)
    test_env.reset()
    done = 0
    while done == 0:
        action, _ = agent.greedy(state)
        nxt, _, done, _ = smoothed.step(action)
        test_env.step(action)
        state = process_state(nxt, coef)
    return sharpe(test_env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--steps", required=True, help="comma-separated steps per episode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--torch-site")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    steps = [int(s) for s in args.steps.split(",")]

    raw_train, raw_test = Env(load(args.train)), Env(load(args.test))
    train_env = low_pass(raw_train)  # the training data augmentation (filter order 5)
    if max(steps) > len(train_env.data.index) - WINDOW:
        sys.exit(f"an episode of {max(steps)} steps does not fit in the training data")
    agent = Agent(4 * (WINDOW - 1) + 1)
    per_episode = []
    t0 = time.perf_counter()
    total_train = total_eval = 0.0
    for n in steps:
        a = time.perf_counter()
        done_steps = train_episode(agent, train_env, n)
        b = time.perf_counter()
        sh_train = testing(agent, raw_train, raw_train)
        sh_test = testing(agent, raw_train, raw_test)
        c = time.perf_counter()
        total_train += b - a
        total_eval += c - b
        per_episode.append({"steps": done_steps, "train_s": b - a, "eval_s": c - b,
                            "train_sharpe": sh_train, "test_sharpe": sh_test})
    wall = time.perf_counter() - t0
    env_steps = sum(p["steps"] for p in per_episode)
    res = {
        "impl": "pytorch-reference",
        "torch": torch.__version__, "pandas": pd.__version__, "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "episodes": len(steps), "env_steps": env_steps, "gradient_steps": agent.learn_steps,
        "train_s": total_train, "eval_s": total_eval, "wall_s": wall,
        "steps_per_s": env_steps / total_train,
        "episodes_per_s": len(steps) / wall,
        "per_episode": per_episode,
    }
    text = json.dumps(res, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
