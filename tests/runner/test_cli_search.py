"""The search commands as a user runs them (subprocesses): bad specs refused before any row is written, and the
commands that read a finished search back (status, list, front, recipe, cancel, db upgrade).

Commands are started together in a module fixture (a torch import costs seconds per process).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner_helpers import evomerge, hybrid_job, job, write_spec
from evomerge.merging import Recipe
from evomerge.service.results import summarize
from evomerge.service.runner import run_search, submit
from evomerge.spec import JobSpec
from evomerge.storage import Store
from evomerge.workers import make_executor


def _bad_specs(bed: Path, folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (spec file, words the error line must hold)."""
    wide = folder / "wide_expert"
    shutil.copytree(bed / "expert_5_9", wide)
    state = load_file(wide / "model.safetensors")
    state["0.weight"] = np.zeros((128, 64), dtype=np.float32)
    save_file(state, wide / "model.safetensors")

    def variant(name: str, edit) -> Path:
        data = job(bed, budget=8)
        edit(data)
        return write_spec(folder, name, data)

    return {
        "algorithm": (variant("algorithm", lambda d: d["algorithm"].update(name="cmaess")),
                      ("algorithm.name", "cmaess")),
        "option": (variant("option", lambda d: d["algorithm"]["options"].update(popsise=4)),
                   ("algorithm.options.popsise",)),
        "bounds": (variant("bounds", lambda d: d["space"]["search"].update(weight=[1.5, 0.0])),
                   ("space.search", "weight", "low < high")),
        "budget": (variant("budget", lambda d: d["budget"].update(evaluations=0)), ("budget.evaluations",)),
        "model": (variant("model", lambda d: d["models"]["experts"][1].update(path=str(bed / "nothere"))),
                  ("models.experts.1.path", "nothere")),
        "data": (variant("data", lambda d: d["objectives"][1]["task"].update(data=str(bed / "missing.npz"))),
                 ("objectives.acc_5_9.task.data", "missing.npz")),
        "mismatch": (variant("mismatch", lambda d: d["models"]["experts"][1].update(path=str(wide))),
                     ("models.experts", "0.weight")),
    }


class Workspace:
    def __init__(self, root: Path, bed: Path) -> None:
        self.root, self.bed = root, bed
        self.db = f"sqlite:///{root / 'cli.db'}"
        self.runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
        self.bad = _bad_specs(bed, root / "bad")
        with Store(self.db) as store:  # one finished search to read back (run here: no process start-up)
            spec = JobSpec.from_dict(job(bed, budget=18))
            self.search_id = submit(store, spec)
            with make_executor(spec, kind="inline") as executor:
                run_search(store, self.search_id, executor=executor)
            self.summary = summarize(store, self.search_id)


@pytest.fixture(scope="module")
def ws(digits: Path, llama: Path, tmp_path_factory: pytest.TempPathFactory):
    workspace = Workspace(tmp_path_factory.mktemp("cli-search"), digits)
    sid, db, out = workspace.search_id, workspace.db, workspace.root

    def go(name: str, *args) -> None:
        workspace.runs[name] = pool.submit(evomerge, *args)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, (path, _) in workspace.bad.items():
            go(f"bad_{name}", "run", path, "--db", db, "--executor", "inline")
        go("missing_bed", "run", write_spec(out / "nobed", "nobed", job(out / "nobed" / "testbeds" / "digits")),
           "--db", db)
        go("best_yaml", "recipe", sid, "--candidate", "best", "--db", db)
        go("export_json", "recipe", "export", sid, "--candidate", "3", "--format", "json", "-o", out / "c3.json",
           "--db", db)
        go("no_candidate", "recipe", sid, "--candidate", "999", "--db", db)
        go("no_search", "status", "77", "--db", db)
        go("status", "status", sid, "--json", "--db", db)
        go("status_table", "status", sid, "--db", db)
        go("list", "list", "--json", "--db", db)
        go("front_json", "front", sid, "--json", "--db", db)
        go("front_csv", "front", sid, "-o", out / "front.csv", "--db", db)
        go("front_png", "front", sid, "-o", out / "front.png", "--db", db)
        go("front_txt", "front", sid, "-o", out / "front.txt", "--db", db)
        go("cancel_done", "cancel", sid, "--db", db)
        go("upgrade", "db", "upgrade", "--db", f"sqlite:///{out / 'fresh.db'}")
        go("validate", "recipe", "validate", out / "nothere.yml")
        go("huge_id", "status", "99999999999999999999", "--db", db)
        go("huge_candidate", "recipe", sid, "--candidate", "99999999999999999999", "--db", db)
        hybrid = hybrid_job(llama, budget=8, pause={"fail_every": 1})
        go("stage1_fails", "run", write_spec(out / "hybrid", "hybrid", hybrid), "--db", f"sqlite:///{out / 'h.db'}",
           "--executor", "inline", "--json")
        yield workspace


def result(ws: Workspace, name: str) -> subprocess.CompletedProcess[str]:
    return ws.runs[name].result()


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", ["algorithm", "option", "bounds", "budget", "model", "data", "mismatch"])
def test_bad_spec_exits_2_naming_the_field_and_writes_no_row(ws: Workspace, name: str) -> None:
    one_line_error(result(ws, f"bad_{name}"), *ws.bad[name][1])
    for other in ws.runs.values():  # every other command has finished: no command wrote a search
        other.result()
    with Store(ws.db) as store:
        assert [r.id for r in store.list_searches()] == [ws.search_id]


def test_missing_test_bed_says_how_to_build_it(ws: Workspace) -> None:
    one_line_error(result(ws, "missing_bed"), "models.base", "evomerge testbed build digits")


def test_recipe_best_is_the_best_candidates_mergekit_yaml(ws: Workspace) -> None:
    r = result(ws, "best_yaml")
    assert r.returncode == 0, r.stderr
    recipe = Recipe.from_mergekit_yaml(r.stdout)
    with Store(ws.db) as store:
        stored = Recipe.model_validate_json(store.candidate(ws.search_id, ws.summary.best.index).recipe)
    assert recipe.merge_method == "ties" == stored.merge_method
    assert [m.parameters for m in recipe.models] == [m.parameters for m in stored.models]


def test_recipe_export_json_to_a_file(ws: Workspace) -> None:
    r = result(ws, "export_json")
    assert r.returncode == 0, r.stderr
    with Store(ws.db) as store:
        assert (ws.root / "c3.json").read_text().strip() == store.candidate(ws.search_id, 3).recipe


def test_unknown_candidate_or_search(ws: Workspace) -> None:
    one_line_error(result(ws, "no_candidate"), "--candidate", "999")
    one_line_error(result(ws, "no_search"), "77")


def test_status_json_holds_counts_best_and_front(ws: Workspace) -> None:
    r = result(ws, "status")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["id"] == ws.search_id and doc["status"] == "done"
    assert doc["counts"] == {"pending": 0, "done": 18, "failed": 0, "total": 18}
    assert doc["best"] == ws.summary.best.to_dict()
    assert [p["id"] for p in doc["front"]] == [p.index for p in ws.summary.front]
    assert all(set(p["holdout"]) == {"acc_0_4", "acc_5_9"} for p in doc["front"])
    table = result(ws, "status_table")
    assert table.returncode == 0 and f"candidate {ws.summary.best.index}" in table.stdout
    assert "Pareto front" in table.stdout


def test_list_json(ws: Workspace) -> None:
    r = result(ws, "list")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["id"] == ws.search_id and row["counts"]["done"] == 18


def test_front_as_json_csv_and_png(ws: Workspace) -> None:
    doc = json.loads(result(ws, "front_json").stdout)
    assert [p["id"] for p in doc["front"]] == [p.index for p in ws.summary.front]
    assert doc == json.loads(result(ws, "status").stdout)  # the one summary document: id, status, counts, ...
    assert doc["status"] == "done" and doc["counts"]["done"] == 18
    assert result(ws, "front_csv").returncode == 0
    lines = (ws.root / "front.csv").read_text().splitlines()
    assert lines[0].startswith("candidate,kind,acc_0_4,acc_5_9") and len(lines) == 1 + len(ws.summary.front)
    r = result(ws, "front_png")
    assert r.returncode == 0, r.stderr
    assert (ws.root / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(result(ws, "front_txt"), "--output", ".csv or .png")


def test_cancel_a_finished_search_changes_nothing(ws: Workspace) -> None:
    r = result(ws, "cancel_done")
    assert r.returncode == 0 and "already done" in r.stdout


def test_db_upgrade_creates_the_schema(ws: Workspace) -> None:
    r = result(ws, "upgrade")
    assert r.returncode == 0, r.stderr
    assert "database ready" in r.stdout and (ws.root / "fresh.db").is_file()


def test_recipe_subcommands_still_work(ws: Workspace) -> None:
    one_line_error(result(ws, "validate"), "nothere.yml")


def test_ids_beyond_sql_integers_are_a_one_line_error(ws: Workspace) -> None:
    one_line_error(result(ws, "huge_id"), "ID", "99999999999999999999", "not a search id")
    one_line_error(result(ws, "huge_candidate"), "--candidate", "not a candidate id")


def test_a_hybrid_whose_stage_1_fails_entirely_is_one_line_and_still_a_json_document(ws: Workspace) -> None:
    r = result(ws, "stage1_fails")
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "stage 1 of search 1 ended without a successful candidate" in line
    assert "planned failure" in line  # the first candidate's error
    doc = json.loads(r.stdout)
    counts = doc["counts"]
    assert doc["status"] == "failed" and counts["failed"] == counts["total"] > 0 and counts["pending"] == 0
    assert doc["error"].startswith("stage 1 of search 1 ended") and doc["best"] is None
