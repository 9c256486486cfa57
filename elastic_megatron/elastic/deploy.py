"""The deployed family: the router's preferred subnets, moved onto their budgets.

The router is trained on the *expected* cost under Gumbel noise, but what `slice` cuts is one
subnet per budget, and the noise-free argmax of the logits can miss its target by several percent
(measured 8.7 % under, docs/results.md): the budget loss is satisfied by a mixture, not by its mode.
So the deployed subnet is the most probable one *whose exact cost is within `tol` of the target*:

    start at the argmax (clipped to the next larger budget's subnet, so the family stays nested);
    then, while the cost is outside [target * (1 - tol), target * (1 + tol)], move one choice on one
    axis (one layer for a per-layer axis) down if over, up if under (or, when under, one up and one
    down elsewhere, since a single step may overshoot): a move landing in the window first, else
    the one giving up the least log-probability per unit of cost moved, never back to a state
    already visited (so it ends), never outside the larger budget's subnet.

Greedy, exact in cost (`router.cost_of`), deterministic: the same router state gives the same
family on every rank and in every later job (slice, export-hf, generate), which is what lets
training freeze it (`router: frozen` curriculum stages) and run the very subnets it will deploy.
"""

from __future__ import annotations

from typing import Optional

import torch

from .subnet import Subnet, nest_family


def _limits(router, axis: str, order: list[int], cap: Optional[Subnet]) -> list[int]:
    """Per row of `axis` (one row, or one per layer of its type): the largest position in value
    `order` whose size fits inside `cap` (0 when none does; nest_family clips that case)."""
    vals = router.choices.of(axis)
    rows = router.count[axis] if axis in router.heterogeneous else 1
    if cap is None:
        return [len(vals) - 1] * rows
    if axis == "hidden":
        limits = [cap.hidden]
    elif axis == "depth":
        limits = [sum(cap.keep)]
    else:
        per_layer = list(getattr(cap, axis))
        limits = per_layer if axis in router.heterogeneous else [min(per_layer)]
    return [max((p for p, i in enumerate(order) if vals[i] <= lim), default=0) for lim in limits]


def deployed_subnet(router, budget_idx: int, cap: Optional[Subnet] = None, tol: float = 0.02,
                    cut: Optional[str] = None, raise_: Optional[str] = None) -> Optional[Subnet]:
    """The subnet `slice` cuts for one budget (module docstring); `cap`: the next larger budget's.
    `cut`: an axis forced one step below the router's mode on every row (and kept at or below it), so
    the search spends the budget elsewhere; `raise_`: one step above (and kept at or above it), so
    the search saves it elsewhere. Each gives one alternative proposal for `deployed_candidates`
    (None when that axis has no smaller / larger choice inside the cap)."""
    target = router.targets[budget_idx]
    with torch.no_grad():
        logp = {a: torch.log_softmax(z.double(), -1).cpu() for a, z in router.logits(budget_idx).items()}
    # choices of every axis sorted by value, so "one step" means the next smaller / larger size
    order = {a: sorted(range(len(router.choices.of(a))), key=lambda i, a=a: router.choices.of(a)[i])
             for a in logp}
    limit = {a: _limits(router, a, order[a], cap) for a in logp}
    # state: per axis, per row, a position in value order; start at the argmax under the cap
    pos = {a: [max(range(limit[a][r] + 1), key=lambda p, row=row, a=a: float(row[order[a][p]]))
               for r, row in enumerate(lp.view(-1, lp.shape[-1]))] for a, lp in logp.items()}
    floor = {a: [0] * len(pos[a]) for a in pos}  # the smallest position the search may move a row to
    if cut is not None:
        if all(p == 0 for p in pos[cut]):
            return None  # already at its smallest choice: no alternative along this axis
        limit[cut] = [max(p - 1, 0) for p in pos[cut]]
        pos[cut] = list(limit[cut])
    if raise_ is not None:
        if all(p == lim for p, lim in zip(pos[raise_], limit[raise_])):
            return None  # already at its largest choice inside the cap
        floor[raise_] = [min(p + 1, lim) for p, lim in zip(pos[raise_], limit[raise_])]
        pos[raise_] = list(floor[raise_])

    def subnet(p) -> Subnet:
        return router.to_subnet({a: torch.tensor([order[a][i] for i in rows]).view(logp[a].shape[:-1])
                                 for a, rows in p.items()})

    def score(a, r, new) -> float:
        row = logp[a].view(-1, logp[a].shape[-1])[r]
        return float(row[order[a][pos[a][r]]] - row[order[a][new]])  # log-probability given up (>= 0 from the mode)

    cost = router.cost_of(subnet(pos))
    lo, hi = target * (1 - tol), target * (1 + tol)
    moves = [(a, r) for a in pos for r in range(len(pos[a]))]

    def state(p) -> tuple:
        return tuple(tuple(v) for v in p.values())

    def step(changes):  # [(axis, row, new position)] -> (log-probability given up, new cost, new state) or None
        trial = {k: list(v) for k, v in pos.items()}
        given_up = 0.0
        for a, r, new in changes:
            if not floor[a][r] <= new <= limit[a][r]:
                return None
            given_up += score(a, r, new)
            trial[a][r] = new
        if state(trial) in seen:  # never back to a state already visited: the search ends
            return None
        return given_up, router.cost_of(subnet(trial)), state(trial)

    seen = {state(pos)}
    for _ in range(10_000):  # every accepted move leads to a state not seen before: this ends
        if lo <= cost <= hi:
            break
        if cost > hi:  # one step down, the cheapest in log-probability per unit of cost saved
            cands = [[(a, r, pos[a][r] - 1)] for a, r in moves]
        else:  # one step up; or one up and one down elsewhere (a single step may overshoot)
            cands = [[(a, r, pos[a][r] + 1)] for a, r in moves]
            cands += [[(a, r, pos[a][r] + 1), (a2, r2, pos[a2][r2] - 1)]
                      for a, r in moves for a2, r2 in moves if (a, r) != (a2, r2)]
        best = None
        for changes in cands:
            got = step(changes)
            if got is None or got[1] == cost:
                continue
            given_up, c, _ = got
            if (c < cost) != (cost > hi):  # wrong direction
                continue
            # into the window first, then the least log-probability per unit of cost moved
            key = (not lo <= c <= hi, given_up / abs(c - cost))
            if best is None or key < best[0]:
                best = (key, changes, c, got[2])
        if best is None:  # no move left: as close as the choices allow
            break
        for a, r, new in best[1]:
            pos[a][r] = new
        cost = best[2]
        seen.add(best[3])
    return subnet(pos)


def deployed_candidates(router, budget_idx: int, cap: Optional[Subnet], tol: float, k: int) -> list[Subnet]:
    """Up to `k` distinct on-budget proposals inside `cap`: the router's deployed subnet first, then
    the same search with one axis moved a step off the router's mode, for each axis in the order
    the router lists them: a step below (`cut`), then a step above (`raise_`). Why: at small budgets
    the router's logits are close between "cut this axis" and "cut that one", so its mode flips
    between seeds; measured (docs/results.md, issue 23): one seed's 0.5 mode took hidden 144 where
    the run before it took 168, held-out loss 0.325 against 0.286, short accuracy 0.238 against
    0.328. Proposals in both directions, scored on held-out loss, decide on evidence; with only
    cuts, a mode that is already too small on an axis could never be corrected."""
    out = [deployed_subnet(router, budget_idx, cap, tol)]
    lo, hi = router.targets[budget_idx] * (1 - tol), router.targets[budget_idx] * (1 + tol)
    with torch.no_grad():
        axes = list(router.logits(budget_idx))
    for axis in axes:
        for move in ({"cut": axis}, {"raise_": axis}):
            if len(out) >= k:
                return out
            s = deployed_subnet(router, budget_idx, cap, tol, **move)
            # only subnets on budget, nested in the larger one, and new
            if s is not None and lo <= router.cost_of(s) <= hi and (cap is None or s.is_within(cap)) and s not in out:
                out.append(s)
    return out[:k]


def deployed_family(router, fixed: dict[int, Subnet], tol: float, score=None, k: int = 1,
                    record: Optional[list] = None) -> list[Subnet]:
    """One subnet per budget (largest first), nested: a fixed one where `fixed` has it (the full
    model, a hand-picked subnet), else `deployed_subnet` inside the previous budget's. With `score`
    (subnet -> held-out loss) and k > 1: the router proposes `deployed_candidates`, the lowest
    score is deployed (router proposes, validation disposes); each budget is chosen inside the
    larger budget's *chosen* subnet, so the family stays nested. `record`: a list that receives
    (budget index, proposals, their scores) for every budget the search chose (the evidence that
    benchmarks/seeds.py reports)."""
    out: list[Subnet] = []
    for b in range(len(router.targets)):
        cap = out[-1] if out else None
        if b in fixed:
            out.append(fixed[b])
        elif tol <= 0:
            out.append(router.inference(b))
        elif score is not None and k > 1:
            props = deployed_candidates(router, b, cap, tol, k)
            scores = [score(p) for p in props]
            if record is not None:
                record.append((b, props, scores))
            out.append(props[scores.index(min(scores))])  # the first of equal scores, as min() would
        else:
            out.append(deployed_subnet(router, b, cap, tol))
    return nest_family(out)  # a hand-picked subnet need not fit inside the one before it
