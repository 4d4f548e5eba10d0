"""The dashboard's charts as Plotly figures (plain JSON, drawn by the bundled Plotly.js with ``Plotly.react``).

Built here, in Python, from what :mod:`evomerge.service.results` reads back, so each chart is a pure function
that tests can check without a browser:

* :func:`front_figure` — the Pareto front. Two objectives: every evaluated candidate, the front joined by its
  staircase, the best candidate and the experts scored alone as reference points. Three: the same in 3-D. More:
  parallel coordinates of the front (and the experts).
* :func:`progress_figure` — each candidate's score and the best score so far against evaluations, with each
  objective's best so far.
* :func:`map_figure` — MAP (arXiv 2406.07529): the front its surrogates predicted against the front it then
  evaluated, each evaluated point joined to its prediction, with the front R² per objective.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from evomerge.service.results import Scoring, Summary

GREY = "rgba(140,140,140,0.45)"
BLUE = "#1f77b4"
ORANGE = "#ff7f0e"
RED = "#d62728"
GREEN = "#2ca02c"
MAX_POINTS = 5000  # candidates drawn behind the front (the newest); the front and best are always drawn


def _num(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {"title": {"text": title, "font": {"size": 14}}, "margin": {"l": 55, "r": 15, "t": 40,
                                                                                         "b": 45},
                              "legend": {"orientation": "h", "y": -0.18}, "hovermode": "closest",
                              "template": "plotly_white"}
    layout.update(extra)
    return layout


def _axis(summary: Summary, k: int) -> str:
    objective = summary.objectives[k]
    arrow = "↑" if objective.maximize else "↓"
    return f"{objective.name} {arrow}"


def _hover(names: Sequence[str]) -> str:
    return "candidate %{customdata}<br>" + "<br>".join(f"{n}: %{{{'xyz'[i]}:.4f}}" for i, n in enumerate(names))


def front_figure(summary: Summary, scored: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """The Pareto front of ``summary`` over ``scored`` (every evaluated candidate: (id, values))."""
    names = summary.names
    scored = list(scored)[-MAX_POINTS:]
    front = summary.front
    best = summary.best
    refs = [r for r in summary.references if r.get("values")]
    if len(names) >= 4:
        return _parallel(summary, refs)
    fig = go.Figure()
    if len(names) == 3:
        coords = names

        def xyz(values_list: Sequence[Mapping[str, Any]]) -> dict[str, list]:
            return {axis: [_num(v.get(n)) for v in values_list] for axis, n in zip("xyz", coords)}

        fig.add_trace(go.Scatter3d(**xyz([v for _, v in scored]), mode="markers", name="candidates",
                                   customdata=[i for i, _ in scored], hovertemplate=_hover(names),
                                   marker={"size": 2.5, "color": GREY}))
        fig.add_trace(go.Scatter3d(**xyz([p.values for p in front]), mode="markers", name="front",
                                   customdata=[p.index for p in front], hovertemplate=_hover(names),
                                   marker={"size": 4.5, "color": BLUE}))
        if best is not None:
            fig.add_trace(go.Scatter3d(**xyz([best.values]), mode="markers", name=f"best (#{best.index})",
                                       customdata=[best.index], hovertemplate=_hover(names),
                                       marker={"size": 8, "color": ORANGE, "symbol": "diamond"}))
        if refs:
            fig.add_trace(go.Scatter3d(**xyz([r["values"] for r in refs]), mode="markers+text", name="experts",
                                       text=[f"expert {r['name']}" for r in refs],
                                       marker={"size": 6, "color": RED, "symbol": "square"}))
        fig.update_layout(**_layout(f"Pareto front: {len(front)} of {len(scored)} evaluated",
                                    scene={"xaxis_title": _axis(summary, 0), "yaxis_title": _axis(summary, 1),
                                           "zaxis_title": _axis(summary, 2)}))
        return fig.to_plotly_json()
    if len(names) == 1:  # one objective: values against candidate ids
        name = names[0]
        fig.add_trace(go.Scatter(x=[i for i, _ in scored], y=[_num(v.get(name)) for _, v in scored],
                                 mode="markers", name="candidates", marker={"color": GREY, "size": 5}))
        if best is not None:
            fig.add_trace(go.Scatter(x=[best.index], y=[best.values[name]], mode="markers",
                                     name=f"best (#{best.index})",
                                     marker={"color": ORANGE, "size": 14, "symbol": "star"}))
        for r in refs:
            fig.add_hline(y=_num(r["values"].get(name)), line={"color": RED, "dash": "dot"},
                          annotation_text=f"expert {r['name']}")
        fig.update_layout(**_layout(f"{len(scored)} evaluated", xaxis_title="candidate",
                                    yaxis_title=_axis(summary, 0)))
        return fig.to_plotly_json()
    x, y = names
    fig.add_trace(go.Scatter(x=[_num(v.get(x)) for _, v in scored], y=[_num(v.get(y)) for _, v in scored],
                             customdata=[i for i, _ in scored], mode="markers", name="candidates",
                             hovertemplate=_hover(names) + "<extra></extra>", marker={"color": GREY, "size": 6}))
    ordered = sorted(front, key=lambda p: p.values[x])
    # The staircase is the edge of the region the front dominates: sorted by x, it steps vertically first when x
    # is maximized (the next point's better x is paid for on y at the current x), horizontally first when not.
    shape = "vh" if summary.objectives[0].maximize else "hv"
    fig.add_trace(go.Scatter(x=[p.values[x] for p in ordered], y=[p.values[y] for p in ordered],
                             customdata=[p.index for p in ordered], mode="lines+markers", name="front",
                             line={"shape": shape, "color": BLUE, "width": 1.5},
                             hovertemplate=_hover(names) + "<extra>front</extra>",
                             marker={"color": BLUE, "size": 9}))
    if best is not None:
        fig.add_trace(go.Scatter(x=[best.values[x]], y=[best.values[y]], customdata=[best.index], mode="markers",
                                 name=f"best (#{best.index})", hovertemplate=_hover(names) + "<extra>best</extra>",
                                 marker={"color": ORANGE, "size": 17, "symbol": "star",
                                         "line": {"color": "black", "width": 1}}))
    if refs:
        fig.add_trace(go.Scatter(x=[_num(r["values"].get(x)) for r in refs], y=[_num(r["values"].get(y)) for r in refs],
                                 mode="markers+text", name="experts alone",
                                 text=[f"expert {r['name']}" for r in refs], textposition="top center",
                                 marker={"color": RED, "size": 12, "symbol": "diamond"}))
    fig.update_layout(**_layout(f"Pareto front: {len(front)} of {len(scored)} evaluated",
                                xaxis_title=_axis(summary, 0), yaxis_title=_axis(summary, 1)))
    return fig.to_plotly_json()


def _parallel(summary: Summary, refs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Four or more objectives: one line per front member (coloured by score), experts in red."""
    names = summary.names
    front = summary.front
    rows = [p.values for p in front] + [r["values"] for r in refs]
    color = [p.score if math.isfinite(p.score) else 0.0 for p in front]
    low = min(color) if color else 0.0
    color += [low - 1.0] * len(refs)  # below every front score: drawn in the scale's first (red) colour
    dims = []
    for k, name in enumerate(names):
        values = [_num(v.get(name)) for v in rows]
        finite = [v for v in values if v is not None]
        dims.append({"label": _axis(summary, k), "values": [np.nan if v is None else v for v in values],
                     **({"range": [min(finite), max(finite)]} if finite else {})})
    scale = [[0.0, RED], [0.001, "#c6dbef"], [1.0, BLUE]] if refs else "Blues"
    fig = go.Figure(go.Parcoords(dimensions=dims, line={"color": color, "colorscale": scale,
                                                         "showscale": False}))
    note = f" and {len(refs)} experts (red)" if refs else ""
    fig.update_layout(**_layout(f"Pareto front: {len(front)} candidates{note}", margin={"l": 70, "r": 70,
                                                                                        "t": 60, "b": 30}))
    return fig.to_plotly_json()


def progress_figure(scoring: Scoring, scored: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """Each evaluated candidate's score (dots) and the best so far (line) against the candidate id, with every
    objective's own best so far (dotted, on a second axis when there are several)."""
    names = scoring.names
    scored = sorted(scored, key=lambda item: item[0])
    ids = [i for i, _ in scored]
    F = np.array([[(_num(v.get(n)) if _num(v.get(n)) is not None else np.nan) for n in names] for _, v in scored],
                 dtype=np.float64).reshape(len(scored), len(names))
    scores = scoring.scores(F) if len(scored) else np.zeros(0)
    best = np.fmax.accumulate(np.where(np.isfinite(scores), scores, np.nan)) if len(scores) else scores
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ids, y=[_num(s) for s in scores], mode="markers", name="candidate score",
                             marker={"color": GREY, "size": 5}))
    fig.add_trace(go.Scatter(x=ids, y=[_num(s) for s in best], mode="lines", name="best so far",
                             line={"shape": "hv", "color": ORANGE, "width": 2.5}))
    if len(names) > 1:
        for k, objective in enumerate(scoring.objectives):
            column = F[:, k]
            sign = 1.0 if objective.maximize else -1.0
            running = sign * np.fmax.accumulate(sign * column) if len(column) else column
            fig.add_trace(go.Scatter(x=ids, y=[_num(v) for v in running], mode="lines", yaxis="y2",
                                     name=f"best {objective.name}", line={"shape": "hv", "dash": "dot",
                                                                          "width": 1.5}))
    extra: dict[str, Any] = {"xaxis_title": "candidate (evaluation order)",
                             "yaxis_title": f"{scoring.scalarize} score"}
    if len(names) > 1:
        extra["yaxis2"] = {"overlaying": "y", "side": "right", "title": "objective", "showgrid": False}
    fig.update_layout(**_layout("Best so far", **extra))
    return fig.to_plotly_json()


def map_figure(report: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, Any] | None:
    """MAP's predicted front against the evaluated one (the first two objectives of the current sub-problem);
    ``None`` when the report has no predicted front yet."""
    if not report or not report.get("predicted_front"):
        return None
    predicted = np.asarray(report["predicted_front"].get("values") or [], dtype=np.float64)
    if predicted.ndim != 2 or predicted.shape[1] < 1:
        return None
    m = predicted.shape[1]
    # nested MAP's sub-problems combine objectives: their own count differs from the search's
    labels = list(names) if len(names) == m else [f"objective {k + 1}" for k in range(m)]
    if m == 1:
        return None
    x, y = 0, 1
    fig = go.Figure()
    order = np.argsort(predicted[:, x])
    fig.add_trace(go.Scatter(x=predicted[order, x], y=predicted[order, y], mode="lines+markers",
                             name="predicted by the surrogates",
                             line={"color": GREEN, "dash": "dash"},
                             marker={"color": GREEN, "size": 6, "symbol": "circle-open"}))
    evaluated = report.get("evaluated_front") or {}
    values = np.asarray(evaluated.get("values") or [], dtype=np.float64)
    guesses = np.asarray(evaluated.get("predicted") or [], dtype=np.float64)
    if values.ndim == 2 and len(values):
        if guesses.shape == values.shape:
            lx: list[float | None] = []
            ly: list[float | None] = []
            for real, guess in zip(values, guesses):
                lx += [_num(guess[x]), _num(real[x]), None]
                ly += [_num(guess[y]), _num(real[y]), None]
            fig.add_trace(go.Scatter(x=lx, y=ly, mode="lines", name="prediction → evaluation",
                                     line={"color": "rgba(0,0,0,0.25)", "width": 1}, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=[_num(v) for v in values[:, x]], y=[_num(v) for v in values[:, y]],
                                 mode="markers", name="evaluated", marker={"color": BLUE, "size": 9}))
    r2 = report.get("front_r2") or report.get("r2")
    note = ""
    if r2:
        note = " · R² " + ", ".join(f"{labels[k]} {v:.3f}" if v is not None else f"{labels[k]} -"
                                    for k, v in enumerate(r2[:m]))
    fig.update_layout(**_layout(f"MAP: predicted vs evaluated front{note}", xaxis_title=labels[x],
                                yaxis_title=labels[y]))
    return fig.to_plotly_json()


def figures(summary: Summary, scored: Sequence[tuple[int, Mapping[str, Any]]],
            report: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every chart of a search's page: ``{"front", "progress", "map"}`` (``map`` is ``None`` unless MAP)."""
    return {"front": front_figure(summary, scored), "progress": progress_figure(summary.scoring, scored),
            "map": map_figure((report or {}).get("optimizer"), summary.names)
            if summary.row.algorithm == "map" else None}


__all__ = ["figures", "front_figure", "map_figure", "progress_figure"]
