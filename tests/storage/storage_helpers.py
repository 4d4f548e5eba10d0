"""Helpers shared by the storage tests."""

from __future__ import annotations

import threading

from evomerge.storage import Store

OBJECTIVES = [{"name": "acc_0_4", "direction": "maximize"}, {"name": "acc_5_9", "direction": "maximize"}]


def new_search(store: Store, name: str = "s", **overrides: object) -> int:
    """A search with two maximised accuracy objectives."""
    fields: dict = dict(name=name, spec={"name": name, "seed": 0}, algorithm="cmaes", seed=0, budget=20,
                        objectives=OBJECTIVES)
    fields.update(overrides)
    return store.create_search(**fields)


def open_at_once(url: str, n: int = 2) -> tuple[list[Store], list[Exception]]:
    """Open ``n`` Stores on ``url`` from ``n`` threads released together; the stores opened and the errors."""
    barrier, stores, errors = threading.Barrier(n), [], []

    def open_store() -> None:
        barrier.wait(timeout=60)
        try:
            stores.append(Store(url))
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return stores, errors
