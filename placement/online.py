"""Online placement under unknown link delays: a UCB bandit that adapts, against ε-greedy and a static plan.

Why: the planners judge placements by *declared* link delays (probe results), but the delays requests
actually see are unknown distributions that drift with load. Each request is a round: the learner picks
one placement from a candidate set (arms), the request runs on it, the learner sees the delays of the
links that request crossed (semi-bandit feedback) and pays the request's delay.

Learners (all share :class:`Learner`'s interface, so the harness treats them alike):

* :class:`LinkUCB` — combinatorial UCB (CUCB, Chen et al. 2013) on *per-link* delay estimates: every link
  keeps a (discounted) mean of the delays observed on it; the planner sees each link optimistically at
  its lower confidence bound ``mean - c * mean * sqrt(2 ln t / n)`` (a never-seen link at 0), and the
  learner plays the placement with the least rate-weighted delay under those optimistic delays. The
  radius scales with the link's own mean because link delays are positive with a spread proportional to
  their level (queueing); this is the UCB1 radius for a known coefficient of variation ``c``, not a
  sub-Gaussian bound with a known variance (which would need a delay scale nobody declares).
  Optimism explores exactly the links that could still make a placement best; a placement shares links
  with others, so one play refines the estimates of many. ``gamma < 1`` discounts old observations
  (discounted UCB, Garivier & Moulines 2011) so the estimates follow drift, with ``t`` in the bound
  capped at the effective window ``1/(1-gamma)``. With a ``planner`` it also re-plans every
  ``replan_every`` rounds on the optimistic link delays (any offline algorithm, e.g. the heuristic):
  a placement the candidate set lacked becomes a new arm, so the arm set itself adapts to what was
  observed (never-seen links look free, which is what sends the planner to explore them).
* :class:`ArmUCB` — UCB1 over whole placements (bandit feedback: only the request's delay), for contrast.
* :class:`EpsilonGreedy` — the same per-link estimates, no confidence bonus: with probability ``eps`` a
  uniformly random placement, else the best at the estimated means (never-seen links at their declared
  delay).
* :class:`StaticPlan` — the placement best at the declared means, forever (what an offline planner does).

Every learner picks one placement for the whole application per round (a deployment cannot differ per
request), judged on the rate-weighted mean delay over the user nodes (``weights``).

Admission: a request is admitted when the played placement can plausibly meet the application's delay
bound — its delay at the learner's optimistic (UCB) or estimated link delays is within the bound; the
harness reports the admitted share and how many admitted requests still missed the bound.

Regret (:func:`run`) is measured against the best *fixed* placement in hindsight: ``sum_t loss_t(k_t) -
min_k sum_t loss_t(k)`` over the realised delays of all rounds; under drift we also report the *dynamic*
regret against the placement best for the current true means, which a fixed placement cannot reach.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from remora.errors import InvalidInput

from .generators import DelayProcess
from .model import Placement, Problem
from .simulate import DelayEvaluator


class Learner:
    """One online policy. ``arms`` is a :class:`DelayEvaluator`-like object: ``K``, ``L``, ``used[k, u]``
    (links a request of user u crosses under arm k) and ``delays_all_users(x)`` -> (U, K) seconds."""

    name = "learner"

    def __init__(self, arms, declared: np.ndarray, bound: float | None = None, weights=None):
        self.arms = arms
        self.declared = np.asarray(declared, dtype=float)
        if bound is None and hasattr(arms, "problem"):  # default: the application's own delay bound
            bound = arms.problem.app.delay_bound
        self.bound = bound
        n_users = arms.used.shape[1]
        if weights is None and hasattr(arms, "problem"):  # a DelayEvaluator: weight users by their rates
            weights = [arms.problem.users[u] for u in arms.users]
        w = np.ones(n_users) if weights is None else np.asarray(weights, dtype=float)
        self.weights = w / w.sum()
        self._uidx = np.arange(n_users)

    def estimate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """At link delays ``x``: (rate-weighted mean delay per arm (K,), per-user delays (U, K))."""
        per_user = self.arms.delays_all_users(x)
        return self.weights @ per_user, per_user

    def select(self, t: int, u: int) -> tuple[int, bool]:
        """(arm to play, admit?) for round t's request from user u.

        The arm is one placement for the whole application, so it is chosen on the rate-weighted mean
        delay over all users (a deployment cannot differ per request); ``u`` only matters for admission.
        """
        raise NotImplementedError

    def observe(self, t: int, u: int, k: int, x: np.ndarray, loss: float) -> None:
        """Round t's feedback: link delays ``x`` (only ``arms.used[k, u]`` entries are meaningful), loss."""

    def _admit(self, est: float) -> bool:
        return self.bound is None or est <= self.bound

    def bind(self, inst) -> None:
        """Called by :func:`run` before round 0 (learners that add arms keep the instance)."""


class _LinkStats:
    """Per-link (discounted) sums and counts of observed delays."""

    def __init__(self, L: int, gamma: float):
        if not 0 < gamma <= 1:
            raise InvalidInput(f"discount gamma must be in (0, 1], got {gamma}")
        self.S = np.zeros(L)
        self.N = np.zeros(L)
        self.gamma = gamma

    def update(self, mask: np.ndarray, x: np.ndarray) -> None:
        if self.gamma < 1:
            self.S *= self.gamma
            self.N *= self.gamma
        self.S[mask] += x[mask]
        self.N[mask] += 1.0

    def mean(self, prior: np.ndarray) -> np.ndarray:
        seen = self.N > 1e-9
        return np.where(seen, self.S / np.where(seen, self.N, 1.0), prior)


class LinkUCB(Learner):
    """CUCB on per-link delays with optimistic (lower-bound) estimates; ``gamma < 1`` tracks drift."""

    def __init__(self, arms, declared, bound=None, weights=None, *, c: float = 1.0, gamma: float = 1.0,
                 planner=None, replan_every: int = 1000):
        super().__init__(arms, declared, bound, weights)
        self.stats = _LinkStats(arms.L, gamma)
        self.c = c
        self.name = "link-ucb" if gamma == 1 else f"link-ucb(gamma={gamma:g})"
        self.planner = planner
        self.replan_every = replan_every
        self.replans: list[tuple[int, bool]] = []   # (round, did the planner produce a new arm)
        self._inst = None
        if planner is not None:
            if replan_every <= 0:
                raise InvalidInput("replan_every must be positive")
            self.name += "+replan"

    def bind(self, inst) -> None:
        self._inst = inst

    def _replan(self, t: int) -> None:
        """Feed the planner the optimistic link delays; a placement not yet an arm becomes one.

        The per-link statistics do not depend on the arm set, so a new arm is usable at once and is
        judged by everything already observed on its links.
        """
        from .model import Problem as P

        net = self.arms.problem.network
        x = np.maximum(self.optimistic(t), 1e-6)
        seen = {}
        for (i, j), k in self.arms.router.link_of.items():
            seen[(net.nodes[i].name, net.nodes[j].name)] = float(x[k])
        problem = P(net.with_delays(seen), self.arms.problem.app, self.arms.problem.users)
        before = self.arms.K
        self._inst.add_arm(self.planner(problem))
        self.replans.append((t, self.arms.K > before))

    def optimistic(self, t: int) -> np.ndarray:
        st = self.stats
        horizon = t + 1 if st.gamma == 1 else min(t + 1, 1.0 / (1.0 - st.gamma))
        seen = st.N > 1e-9
        mean = st.mean(self.declared)
        radius = self.c * mean * np.sqrt(2.0 * math.log(max(horizon, 2.0)) / np.where(seen, st.N, 1.0))
        return np.where(seen, np.maximum(mean - radius, 0.0), 0.0)

    def select(self, t, u):
        if self.planner is not None and self._inst is not None and t > 0 and t % self.replan_every == 0:
            self._replan(t)
        mean, per_user = self.estimate(self.optimistic(t))
        k = int(np.argmin(mean))
        return k, self._admit(float(per_user[u, k]))

    def observe(self, t, u, k, x, loss):
        self.stats.update(self.arms.used[k, u], x)


class EpsilonGreedy(Learner):
    """Best placement at the estimated per-link means, a uniformly random one with probability ``eps``."""

    def __init__(self, arms, declared, bound=None, weights=None, *, eps: float = 0.1, seed=0):
        super().__init__(arms, declared, bound, weights)
        self.stats = _LinkStats(arms.L, 1.0)
        self.eps = eps
        self.rng = np.random.default_rng(seed)
        self.name = f"eps-greedy({eps:g})"

    def select(self, t, u):
        mean, per_user = self.estimate(self.stats.mean(self.declared))
        k = int(self.rng.integers(self.arms.K)) if self.rng.random() < self.eps else int(np.argmin(mean))
        return k, self._admit(float(per_user[u, k]))

    def observe(self, t, u, k, x, loss):
        self.stats.update(self.arms.used[k, u], x)


class ArmUCB(Learner):
    """UCB1 over whole placements, seeing only each request's delay (no per-link feedback)."""

    def __init__(self, arms, declared, bound=None, weights=None, *, c: float = 1.0):
        super().__init__(arms, declared, bound, weights)
        self.S = np.zeros(arms.K)
        self.N = np.zeros(arms.K)
        self.c = c
        self.name = "arm-ucb"

    def select(self, t, u):
        if (self.N == 0).any():
            k = int(np.argmin(self.N))
            return k, True
        mean = self.S / self.N
        lcb = mean - self.c * mean * np.sqrt(2.0 * math.log(t + 1) / self.N)
        k = int(np.argmin(lcb))
        return k, self._admit(float(lcb[k]))

    def observe(self, t, u, k, x, loss):
        self.S[k] += loss
        self.N[k] += 1


class StaticPlan(Learner):
    """The placement fastest at the declared means for each user, never revised."""

    name = "static"

    def __init__(self, arms, declared, bound=None, weights=None):
        super().__init__(arms, declared, bound, weights)
        mean, self.per_user = self.estimate(self.declared)
        self.choice = int(np.argmin(mean))

    def select(self, t, u):
        return self.choice, self._admit(float(self.per_user[u, self.choice]))


@dataclass
class OnlineInstance:
    """Candidates, the request sequence and the realised delays of every round (the hidden truth)."""

    problem: Problem
    arms: DelayEvaluator
    delays: DelayProcess
    users: np.ndarray          # user index of each round
    X: np.ndarray              # (T, L) realised link delays
    losses: np.ndarray         # (T, K) delay every candidate would have given each round

    @property
    def rounds(self) -> int:
        return len(self.users)

    @classmethod
    def build(cls, problem: Problem, candidates: list[Placement], delays: DelayProcess, rounds: int, seed=0,
              batch: int = 2048) -> OnlineInstance:
        if rounds <= 0:
            raise InvalidInput("rounds must be positive")
        arms = DelayEvaluator(problem, candidates)
        if delays.declared.shape != (arms.L,):
            raise InvalidInput("the delay process must have one declared delay per network link")
        rng = np.random.default_rng(seed)
        rates = np.array([problem.users[u] for u in arms.users], dtype=float)
        users = rng.choice(len(rates), size=rounds, p=rates / rates.sum())
        X = delays.sample(rounds)
        losses = np.concatenate([arms.delays(X[s:s + batch], users[s:s + batch]) for s in range(0, rounds, batch)])
        return cls(problem, arms, delays, users, X, losses)

    def add_arm(self, placement: Placement, batch: int = 2048) -> int:
        """Make ``placement`` an arm (its delays on every round computed from the stored truth); returns
        its index, the existing one when it is already an arm."""
        key = (tuple(sorted(placement.functions.items())), tuple(sorted(placement.states.items())))
        for k, p in enumerate(self.arms.placements):
            if (tuple(sorted(p.functions.items())), tuple(sorted(p.states.items()))) == key:
                return k
        k = self.arms.add(placement)
        single = DelayEvaluator(self.problem, [placement], self.arms.users, router=self.arms.router)
        col = np.concatenate([single.delays(self.X[s:s + batch], self.users[s:s + batch])[:, 0]
                              for s in range(0, self.rounds, batch)])
        self.losses = np.concatenate([self.losses, col[:, None]], axis=1)
        return k

    def copy(self) -> OnlineInstance:
        """An instance sharing the truth (X, users) whose arm set can grow independently."""
        arms = DelayEvaluator(self.problem, list(self.arms.placements), self.arms.users, router=self.arms.router)
        return OnlineInstance(self.problem, arms, self.delays, self.users, self.X, self.losses.copy())

    def dynamic_best(self, batch: int = 2048) -> np.ndarray:
        """Per round, the realised loss of the arm with the lowest rate-weighted delay at the current true
        means (the best a learner that knew the drift could do with one placement at a time)."""
        rates = np.array([self.problem.users[u] for u in self.arms.users], dtype=float)
        w = rates / rates.sum()
        out = np.empty(self.rounds)
        cache: dict[bytes, int] = {}
        for t in range(self.rounds):
            m = self.delays.means(t)
            key = m.tobytes()
            if key not in cache:
                U = len(w)
                cache[key] = int(np.argmin(w @ self.arms.delays(np.broadcast_to(m, (U, m.size)), np.arange(U))))
            out[t] = self.losses[t, cache[key]]
        return out


@dataclass
class RunResult:
    name: str
    arms: np.ndarray                  # arm played each round
    loss: np.ndarray                  # realised delay each round (s)
    regret: np.ndarray                # cumulative regret vs the best fixed arm in hindsight
    dynamic_regret: np.ndarray | None
    admitted: float                   # share of requests admitted
    missed: float                     # share of admitted requests over the bound
    switches: int                     # placement changes (migrations a deployment would make)
    best_fixed: int
    admit: np.ndarray | None = None   # per round: was the request admitted
    extra: dict = field(default_factory=dict)

    def summary(self, checkpoints=(100, 1000, 10_000)) -> dict:
        T = len(self.loss)
        cps = sorted({min(T, c) for c in checkpoints})
        out = {"learner": self.name, "rounds": T, "mean_delay": float(self.loss.mean()),
               "regret": float(self.regret[-1]), "regret_per_round": float(self.regret[-1] / T),
               "regret_per_round_at": {c: float(self.regret[c - 1] / c) for c in cps},
               "admitted": self.admitted, "missed_bound": self.missed, "switches": self.switches}
        if self.dynamic_regret is not None:
            out["dynamic_regret_per_round"] = float(self.dynamic_regret[-1] / T)
        return out


def run(inst: OnlineInstance, learner: Learner, *, dynamic: np.ndarray | None = None,
        reference: np.ndarray | None = None) -> RunResult:
    """Play every round of ``inst`` with ``learner``; regret against the best fixed candidate in hindsight.

    ``reference`` (T, K') replaces ``inst.losses`` as the set the best fixed arm is chosen from (e.g. the
    arms of every learner's run, when a replanning learner added some), so regrets stay comparable.
    """
    T = inst.rounds
    learner.bind(inst)
    played = np.empty(T, dtype=int)
    admitted = np.empty(T, dtype=bool)
    for t in range(T):
        u = int(inst.users[t])
        k, ok = learner.select(t, u)
        played[t] = k
        admitted[t] = ok
        learner.observe(t, u, k, inst.X[t], float(inst.losses[t, k]))
    loss = inst.losses[np.arange(T), played]
    ref = inst.losses if reference is None else reference
    best = int(ref.sum(axis=0).argmin())
    regret = np.cumsum(loss - ref[:, best])
    dyn = np.cumsum(loss - dynamic) if dynamic is not None else None
    bound = inst.problem.app.delay_bound
    missed = float((loss[admitted] > bound).mean()) if bound and admitted.any() else 0.0
    return RunResult(learner.name, played, loss, regret, dyn, float(admitted.mean()), missed,
                     int((played[1:] != played[:-1]).sum()), best, admitted)


def candidate_placements(problem: Problem, planner, *, scenarios: int = 12, spread: float = 0.6, seed=0,
                         extra: list[Placement] = ()) -> list[Placement]:
    """Distinct placements the planner picks under plausible delay scenarios (the learner's arms).

    Scenario 0 is the declared delays (so the static plan is always an arm); the others scale every
    link's declared delay by an independent lognormal(0, ``spread``) factor: where the truth may lie.
    ``planner(problem) -> Placement`` is any offline algorithm (e.g. ``solve`` with the heuristic).
    """
    from .model import Problem as P

    rng = np.random.default_rng(seed)
    net = problem.network
    out: list[Placement] = []
    seen: set = set()

    def add(p: Placement) -> None:
        key = (tuple(sorted(p.functions.items())), tuple(sorted(p.states.items())))
        if key not in seen:
            seen.add(key)
            out.append(p)

    add(planner(problem))
    for _ in range(scenarios - 1):
        f = np.exp(rng.normal(0.0, spread, size=len(net.links)))
        scaled = net.with_delays({(ln.a, ln.b): ln.delay * float(x) for ln, x in zip(net.links, f)})
        add(planner(P(scaled, problem.app, problem.users)))
    for p in extra:
        add(p)
    return out


def colocated_placements(problem: Problem, k: int = 10) -> list[Placement]:
    """"Everything on node v" for the ``k`` nodes nearest the users (rate-weighted declared delay) that fit it.

    When the whole application fits on one node, co-location removes every internal transfer, so the
    real question online is *which* site; these arms differ only in the user-to-site paths, whose
    delays are exactly what is uncertain.
    """
    from .model import violations

    pt = problem.paths
    total = problem.total_rate or 1.0
    score = {n.name: sum(r / total * pt.d(u, n.name) for u, r in problem.users.items()) for n in problem.network.nodes}
    out = []
    for name in sorted(score, key=score.get):
        p = Placement({f.name: name for f in problem.app.functions}, {s.name: name for s in problem.app.states},
                      "colocated")
        if math.isfinite(score[name]) and not violations(problem, p):
            out.append(p)
            if len(out) >= k:
                break
    return out
