"""Helpers shared by the storage tests."""

from __future__ import annotations

from evomerge.storage import Store

OBJECTIVES = [{"name": "acc_0_4", "direction": "maximize"}, {"name": "acc_5_9", "direction": "maximize"}]


def new_search(store: Store, name: str = "s", **overrides: object) -> int:
    """A search with two maximised accuracy objectives."""
    fields: dict = dict(name=name, spec={"name": name, "seed": 0}, algorithm="cmaes", seed=0, budget=20,
                        objectives=OBJECTIVES)
    fields.update(overrides)
    return store.create_search(**fields)
