"""The dashboard's charts are pure functions of what a search stored: checked here without a browser."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from evomerge.service.figures import figures, front_figure, map_figure, progress_figure
from evomerge.service.results import Objective, Point, Scoring, Summary


def _summary(directions: list[str], front: list[tuple[int, list[float]]], refs: dict[str, list[float]] | None = None,
             algorithm: str = "nsga2") -> Summary:
    names = [f"f{k}" for k in range(len(directions))]
    scoring = Scoring(tuple(Objective(n, d) for n, d in zip(names, directions)), "mean")
    points = [Point(i, dict(zip(names, v)), None, float(scoring.scores([v])[0])) for i, v in front]
    points.sort(key=lambda p: -p.score)
    references = [{"name": name, "values": dict(zip(names, v)), "holdout": None} for name, v in (refs or {}).items()]
    row = SimpleNamespace(name="s", algorithm=algorithm)
    return Summary(1, row, scoring, points[0] if points else None, points, references)


def test_two_objectives_draw_candidates_the_front_staircase_the_best_and_the_experts() -> None:
    front = [(3, [0.9, 0.2]), (7, [0.6, 0.7]), (5, [0.3, 0.95])]
    summary = _summary(["maximize", "maximize"], front, {"a": [0.95, 0.05], "b": [0.05, 0.97]})
    scored = [(i, {"f0": x, "f1": y}) for i, (x, y) in enumerate(np.random.default_rng(0).random((10, 2)))]
    figure = front_figure(summary, scored)
    traces = {t["name"]: t for t in figure["data"]}
    assert list(traces) == ["candidates", "front", "best (#7)", "experts alone"]
    assert len(traces["candidates"]["x"]) == 10 and list(traces["candidates"]["customdata"]) == list(range(10))
    assert list(traces["front"]["x"]) == [0.3, 0.6, 0.9]  # sorted along x, joined as a staircase
    # the edge of what the front dominates: from (0.3, 0.95) down to 0.7, then right to (0.6, 0.7)
    assert traces["front"]["line"]["shape"] == "vh" and list(traces["front"]["customdata"]) == [5, 7, 3]
    assert list(traces["best (#7)"]["x"]) == [0.6] and list(traces["experts alone"]["text"]) == ["expert a",
                                                                                                 "expert b"]
    assert "↑" in figure["layout"]["xaxis"]["title"]["text"]
    # x maximized, y minimized: better x costs y, paid at the current x (vertical first) — the same as above
    mixed = front_figure(_summary(["maximize", "minimize"], [(0, [0.5, 1.0]), (1, [0.7, 2.0])]), [])
    assert mixed["data"][1]["line"]["shape"] == "vh"
    assert "↓" in mixed["layout"]["yaxis"]["title"]["text"]
    # x minimized: the points dominated lie right of and below each point, so the edge runs right first
    low_x = front_figure(_summary(["minimize", "maximize"], [(0, [0.5, 1.0]), (1, [0.7, 2.0])]), [])
    assert low_x["data"][1]["line"]["shape"] == "hv"


def test_three_objectives_are_a_3d_scatter_and_more_are_parallel_coordinates() -> None:
    three = front_figure(_summary(["maximize"] * 3, [(0, [1, 2, 3]), (1, [3, 2, 1])], {"e": [0, 0, 0]}),
                         [(0, {"f0": 1, "f1": 2, "f2": 3})])
    assert {t["type"] for t in three["data"]} == {"scatter3d"}
    assert [t["name"] for t in three["data"]] == ["candidates", "front", "best (#0)", "experts"]
    assert three["layout"]["scene"]["zaxis"]["title"]["text"].startswith("f2")

    four = front_figure(_summary(["maximize", "minimize", "maximize", "maximize"],
                                 [(0, [1, 2, 3, 4]), (1, [4, 3, 2, 1]), (2, [2, 1, 4, 3])], {"e": [0, 9, 0, 0]}), [])
    (parcoords,) = four["data"]
    assert parcoords["type"] == "parcoords" and [d["label"] for d in parcoords["dimensions"]] == [
        "f0 ↑", "f1 ↓", "f2 ↑", "f3 ↑"]
    assert sorted(parcoords["dimensions"][1]["values"]) == [1, 2, 3, 9] and parcoords["dimensions"][1]["values"][-1] == 9
    assert len(parcoords["line"]["color"]) == 4  # three front members and the expert


def test_one_objective_plots_values_against_candidates() -> None:
    summary = _summary(["minimize"], [(4, [0.1])], {"e": [0.5]})
    figure = front_figure(summary, [(i, {"f0": v}) for i, v in enumerate([0.9, 0.5, 0.3, 0.2, 0.1])])
    assert [t["name"] for t in figure["data"]] == ["candidates", "best (#4)"]
    assert figure["layout"]["shapes"]  # the expert as a reference line


def test_progress_is_each_score_and_the_running_best_per_objective() -> None:
    scoring = Scoring((Objective("a", "maximize"), Objective("b", "minimize")), "mean")
    scored = [(0, {"a": 0.2, "b": 0.8}), (2, {"a": 0.9, "b": 0.6}), (1, {"a": 0.5, "b": 0.1}),
              (3, {"a": None, "b": 0.2})]
    figure = progress_figure(scoring, scored)
    dots, best, best_a, best_b = figure["data"]
    assert list(dots["x"]) == [0, 1, 2, 3]  # by candidate id
    expected = scoring.scores([[0.2, 0.8], [0.5, 0.1], [0.9, 0.6], [np.nan, 0.2]])
    assert dots["y"][:3] == pytest.approx(expected[:3]) and dots["y"][3] is None
    assert best["y"][:3] == pytest.approx(np.maximum.accumulate(expected[:3]))
    assert best["y"][3] == pytest.approx(best["y"][2])  # a failed score does not lower the best so far
    assert best_a["name"] == "best a" and list(best_a["y"][:3]) == [0.2, 0.5, 0.9]
    assert list(best_b["y"]) == [0.8, 0.1, 0.1, 0.1]  # minimized: the running minimum


def test_map_draws_the_predicted_front_against_the_evaluated_one() -> None:
    report = {"predicted_front": {"values": [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]},
              "evaluated_front": {"values": [[0.85, 0.12], [0.4, 0.55]], "predicted": [[0.9, 0.1], [0.5, 0.5]]},
              "front_r2": [0.91, 0.88]}
    figure = map_figure(report, ["x", "y"])
    assert figure is not None
    names = [t["name"] for t in figure["data"]]
    assert names == ["predicted by the surrogates", "prediction → evaluation", "evaluated"]
    assert list(figure["data"][1]["x"]) == [0.9, 0.85, None, 0.5, 0.4, None]
    assert "R² x 0.910, y 0.880" in figure["layout"]["title"]["text"]
    assert map_figure({}, ["x", "y"]) is None and map_figure(None, ["x", "y"]) is None
    summary = _summary(["maximize", "maximize"], [(0, [0.5, 0.5])], algorithm="map")
    both = figures(summary, [], {"optimizer": report})
    assert both["map"] is not None and both["front"]["data"]
    assert figures(_summary(["maximize", "maximize"], [(0, [0.5, 0.5])]), [], {"optimizer": report})["map"] is None


def test_a_summary_survives_its_json_document() -> None:
    summary = _summary(["maximize", "minimize"], [(0, [0.5, 1.0]), (1, [0.7, 2.0])], {"e": [0.1, 0.2]})
    summary.row = SimpleNamespace(id=1, name="s", status="done", algorithm="nsga2", seed=0, budget=10,
                                  counts={"done": 2}, stop_reason="budget", error=None, created_at=None,
                                  started_at=None, finished_at=None)
    summary.references[0]["score"] = None
    document = summary.to_dict()
    again = Summary.from_dict(document)
    assert again.to_dict() == document
    assert again.best is not None and again.best.index == summary.best.index
