"""Domain groups: the controller sees groups, the sampler draws domains (docs/method.md §7).

`domain_groups: {group: [domain, ...]}` maps a DATA_DIR's (fine) domains into (coarse) groups with
no re-preprocessing. A group's share of the batch is split among its members in proportion to
their training tokens, or as given (`{group: {domain: share}}`). The controller's losses and
tokens are per group: a group's loss is its members' losses weighted by those shares (the mix it
trains on), its tokens their sum. Without groups every domain is its own group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megadrp.errors import ConfigError


@dataclass(frozen=True)
class DomainGroups:
    names: list[str]  # the groups, in order: what the controller and the weights in the metrics are keyed by
    of: np.ndarray  # [domains]: the group of each domain
    share: np.ndarray  # [domains]: each domain's share of its group's batch (summing to 1 within a group)
    # Given `domain_groups` (even one group a domain, renamed or reordered): the controller's
    # numbers are keyed by the groups' names. Without them, by the domains'.
    grouped: bool = True

    @classmethod
    def identity(cls, domains: list[str]) -> "DomainGroups":
        return cls(list(domains), np.arange(len(domains)), np.ones(len(domains)), grouped=False)

    def expand(self, group_weights) -> np.ndarray:
        """Domain weights from group weights: each group's weight split by the shares."""
        return np.asarray(group_weights, dtype=np.float64)[self.of] * self.share

    def aggregate(self, weights) -> np.ndarray:
        """Group weights from domain weights (the inverse of `expand`)."""
        return np.bincount(self.of, weights=np.asarray(weights, dtype=np.float64), minlength=len(self.names))

    def loss(self, domain_loss) -> np.ndarray:
        """Each group's loss: its members' losses weighted by their shares."""
        return np.bincount(self.of, weights=np.asarray(domain_loss, dtype=np.float64) * self.share,
                           minlength=len(self.names))

    def tokens(self, domain_tokens) -> np.ndarray:
        return np.bincount(self.of, weights=np.asarray(domain_tokens, dtype=np.float64), minlength=len(self.names))


def resolve_groups(spec, domains: list[str], train_tokens: list[int], key: str = "domain_groups") -> DomainGroups:
    """`spec` (None, {group: [domain, ...]} or {group: {domain: share}}) against the run's domains:
    every domain in exactly one group; a group of listed domains shares its batch in proportion to
    their training tokens."""
    if not spec:
        return DomainGroups.identity(domains)
    index = {d: i for i, d in enumerate(domains)}
    of = np.full(len(domains), -1)
    share = np.zeros(len(domains))
    names = list(spec)
    for g, (name, members) in enumerate(spec.items()):
        if not isinstance(members, (list, tuple, dict)):
            raise ConfigError(f"{key}.{name}: give a list of domains or a mapping domain: share, not {members!r}")
        given = members if isinstance(members, dict) else None
        listed = list(members)
        if not listed:
            raise ConfigError(f"{key}.{name}: a group needs at least one domain")
        for d in listed:
            if d not in index:
                raise ConfigError(f"{key}.{name}: {d!r} is not one of the run's domains ({', '.join(domains)})")
            if of[index[d]] == g:
                raise ConfigError(f"{key}.{name}: {d!r} is listed twice")
            if of[index[d]] >= 0:
                raise ConfigError(f"{key}: {d!r} is in two groups ({names[of[index[d]]]!r} and {name!r})")
            of[index[d]] = g
        w = np.array([float(given[d]) for d in listed] if given else [float(train_tokens[index[d]]) for d in listed])
        if np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise ConfigError(f"{key}.{name}: the shares (or the members' training tokens) must be positive")
        share[[index[d] for d in listed]] = w / w.sum()
    for g, name in enumerate(names):  # a group may take a domain's name only where it holds that domain
        if name in index and of[index[name]] != g:
            raise ConfigError(f"{key}.{name}: named like the domain {name!r}, which is in group "
                              f"{names[of[index[name]]] if of[index[name]] >= 0 else 'none'!r}; metrics would key "
                              "two things by one name: rename the group")
    missing = [d for d, g in zip(domains, of) if g < 0]
    if missing:
        raise ConfigError(f"{key}: {', '.join(map(repr, missing))} in no group; every domain of the run belongs "
                          "to one (a group may hold a single domain)")
    return DomainGroups(names, of, share)
