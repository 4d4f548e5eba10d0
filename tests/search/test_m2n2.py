"""M2N2 (arXiv 2508.16204): the formulas on hand examples, replacement, the two representations, state, spec."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from evomerge.search import OPTIMIZERS, Problem
from evomerge.search.optimizers.m2n2 import (M2N2, attraction, competition, draw, example_scores, fitness,
                                             least_fit, with_space)
from evomerge.search.spaces.fields import (Field, FieldsSpace, FlatLayout, SeedGram, WeightsSpace, cosine,
                                           crossover_fields, crossover_weights, field_dot, slerp_scales)
from evomerge.spec import JobSpec, SpecError

LAYOUT = FlatLayout.of({"a.weight": 12, "a.bias": 4, "b.weight": 8, "b.bias": 3})  # P = 27
P = LAYOUT.size


def seeds_matrix(s: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((s, P))


def fields_space(seeds: np.ndarray, granularity: str = "element") -> FieldsSpace:
    boundaries = None if granularity == "element" else LAYOUT.offsets
    names = [f"e{i}" for i in range(len(seeds))]
    return FieldsSpace(LAYOUT, SeedGram.from_seeds(seeds, boundaries), names, base="base",
                       sources={"base": "/m/base", **{n: f"/m/{n}" for n in names}}, granularity=granularity)


def optimizer(space, options=None, seed: int = 0, budget: int = 1000) -> M2N2:
    problem = with_space(Problem(dim=space.dim, lower=space.lower, upper=space.upper, budget=budget), space)
    return M2N2(problem, options or {}, seed)


# ----------------------------------------------------------------------------------------- formulas by hand


def test_fitness_sharing_divides_each_example_by_how_many_solve_it() -> None:
    s = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=float)
    # z = [2, 2, 1]: F = [[.5, .5, 0], [.5, 0, 0], [0, .5, 1]]
    np.testing.assert_allclose(competition(s, 1.0), [[.5, .5, 0], [.5, 0, 0], [0, .5, 1]])
    np.testing.assert_allclose(fitness(s, 1.0), [1.0, 0.5, 1.5])
    np.testing.assert_allclose(fitness(s, 0.0), [2.0, 1.0, 2.0])  # α = 0: plain sums
    np.testing.assert_allclose(fitness(s, 2.0), [0.5, 0.25, 1.25])  # z² = [4, 4, 1]
    # An example nobody solves counts z = 1, not a division by zero.
    np.testing.assert_allclose(fitness(np.array([[0.0, 1.0], [0.0, 0.0]]), 1.0), [1.0, 0.0])


def test_attraction_rewards_strength_where_parent_one_is_weak() -> None:
    s = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=float)
    np.testing.assert_allclose(attraction(s, 1.0, 0), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(attraction(s, 1.0, 1), [0.5, 0.0, 1.5])
    np.testing.assert_allclose(attraction(s, 1.0, 2), [0.5, 0.5, 0.0])


def test_draw_is_proportional_and_uniform_when_all_weights_are_zero() -> None:
    w = np.array([0.0, 1.0, 3.0])
    assert [draw(u, w) for u in (0.0, 0.2, 0.25, 0.26, 0.99)] == [1, 1, 2, 2, 2]
    assert [draw(u, np.zeros(4)) for u in (0.0, 0.3, 0.6, 0.99)] == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    counts = np.bincount([draw(rng.random(), w) for _ in range(4000)], minlength=3)
    assert counts[0] == 0 and abs(counts[2] / 4000 - 0.75) < 0.03


def test_the_least_fit_leaves_and_ties_keep_the_child() -> None:
    archive = [[1, 0, 0], [0, 1, 0]]
    assert least_fit(np.array(archive + [[0, 0, 1]], float), 1.0) == 0  # all fitness 1: the first leaves
    assert least_fit(np.array(archive + [[1, 0, 0]], float), 1.0) == 0  # the duplicate shares: .5, 1, .5
    assert least_fit(np.array(archive + [[0, 0, 0]], float), 1.0) == 2  # the child is discarded
    assert least_fit(np.array(archive + [[1, 1, 0]], float), 1.0) == 0  # .5, .5, 1


def test_replacement_rule_in_the_optimizer() -> None:
    space = fields_space(seeds_matrix())
    opt = optimizer(space, {"archive_size": 2})
    genomes = opt.ask(2)
    opt.tell(genomes, [[0.5], [0.5]], [{"acc": np.array([1.0, 0, 0])}, {"acc": np.array([0.0, 1, 0])}])
    child = opt.ask(1)[0]
    opt.tell([child], [[0.0]], [{"acc": np.array([0.0, 0, 0])}])
    assert [m.index for m in opt.members] == [0, 1] and opt.num_discarded == 1
    opt.tell([child], [[1.0]], [{"acc": np.array([0.0, 1, 1])}])  # z = [1, 2, 1]: f = 1, .5, 1.5 → member 1 leaves
    assert [m.index for m in opt.members] == [0, 3] and opt.num_replaced == 1
    opt.tell([child], [[None]], [None])  # a failed child never enters
    assert [m.index for m in opt.members] == [0, 3] and opt.num_failed == 1


def test_per_example_scores_concatenate_objectives_and_turn_losses_into_likelihoods() -> None:
    pe = {"nll": np.array([0.0, np.log(2)]), "acc": np.array([1.0, 0.0])}  # keys out of the objectives' order
    got = example_scores(pe, np.array([0.5, 0.3]), ("maximize", "minimize"), ("acc", "nll"))
    np.testing.assert_allclose(got, [1.0, 0.0, 1.0, 0.5])  # matched by name: acc maximized, nll → exp(−nll)
    with pytest.raises(ValueError, match="objectives are"):
        example_scores({"acc": np.ones(2), "loss": np.ones(2)}, np.array([0.5, 0.3]), ("maximize", "minimize"),
                       ("acc", "nll"))
    with pytest.raises(ValueError, match="different directions"):  # no names: never a guess
        example_scores(pe, np.array([0.5, 0.3]), ("maximize", "minimize"))
    with pytest.raises(ValueError, match="2 objective"):
        example_scores(pe, np.array([0.5]), ("maximize",))
    np.testing.assert_allclose(example_scores(None, np.array([0.7]), ("maximize",)), [0.7])


# ----------------------------------------------------------------------------------------------- crossover


def random_field(rng: np.random.Generator, s: int, cuts: int) -> Field:
    breaks = np.sort(rng.choice(np.arange(1, P), size=cuts, replace=False))
    return Field(breaks, rng.normal(size=(cuts + 1, s)))


@pytest.mark.parametrize("s", [2, 3])
def test_a_field_child_is_the_split_slerp_of_the_materialized_parents(s: int) -> None:
    rng = np.random.default_rng(s)
    seeds = seeds_matrix(s, seed=s)
    gram = SeedGram.from_seeds(seeds)
    for _ in range(20):
        a, b = random_field(rng, s, 3), random_field(rng, s, 4)
        xa, xb = a.materialize(seeds), b.materialize(seeds)
        assert field_dot(a, b, gram, P) == pytest.approx(float(xa @ xb), rel=1e-12)
        cos = cosine(field_dot(a, b, gram, P), field_dot(a, a, gram, P), field_dot(b, b, gram, P))
        split, w_m = int(rng.integers(0, P)), float(rng.random())
        child = crossover_fields(a, b, split, w_m, cos, P)
        expected = crossover_weights(xa, xb, split, w_m, float(xa @ xb / np.linalg.norm(xa) / np.linalg.norm(xb)))
        np.testing.assert_allclose(child.materialize(seeds), expected, rtol=0, atol=1e-10)
        # by hand: t = w_m before the split, 1 - w_m after, SLERP weights from the whole vectors' angle
        omega = np.arccos(cos)
        t = np.where(np.arange(P) < split, w_m, 1 - w_m)
        by_hand = np.sin((1 - t) * omega) / np.sin(omega) * xa + np.sin(t * omega) / np.sin(omega) * xb
        np.testing.assert_allclose(expected, by_hand, atol=1e-10)
        assert child.num_segments <= a.num_segments + b.num_segments + 1


def test_slerp_is_linear_for_parallel_parents() -> None:
    assert slerp_scales(0.3, 1.0) == (0.7, 0.3)
    assert slerp_scales(0.3, 1.0 - 1e-14) == (0.7, 0.3)
    sa, sb = slerp_scales(0.5, 0.0)  # orthogonal: sin(π/4)/1 each
    assert sa == pytest.approx(np.sqrt(0.5)) and sb == pytest.approx(np.sqrt(0.5))


def test_field_genomes_round_trip_and_reject_malformed_ones() -> None:
    f = Field(np.array([3, 20]), np.arange(6.0).reshape(3, 2))
    g = f.genome()
    assert g.tolist() == [3, 3, 20, 0, 1, 2, 3, 4, 5]
    back = Field.from_genome(g, 2, P)
    assert back.breaks.tolist() == [3, 20] and np.array_equal(back.coefficients, f.coefficients)
    for bad in ([0.0], [2, 3, 1, 1], [2, 30, 1, 1, 1, 1], [2, 2.5, 1, 1, 1, 1], [1, np.nan, 1]):
        with pytest.raises(ValueError):
            Field.from_genome(np.array(bad, dtype=float), 2, P)
    assert Field(np.array([5]), np.array([[1.0, 0.0], [1.0, 0.0]])).canonical().num_segments == 1


# ------------------------------------------------------------------------------------- the two representations


def probe_scores(weights: np.ndarray) -> np.ndarray:
    """Deterministic per-example 0/1 scores of a weight vector (a stand-in for correctness)."""
    probes = np.random.default_rng(42).standard_normal((40, P))
    return (probes @ weights > 0).astype(float)


@pytest.mark.parametrize("options", [{}, {"split_granularity": "tensor"}, {"attraction": False},
                                     {"split_point": False}])
def test_fields_and_weights_breed_the_same_children_from_the_same_draws(options: dict) -> None:
    seeds = seeds_matrix(2, seed=5)
    fields = optimizer(fields_space(seeds, options.get("split_granularity", "element")),
                       {"archive_size": 5, **options}, seed=11)
    weights = optimizer(WeightsSpace(LAYOUT, seed_weights=seeds), {"archive_size": 5, **options}, seed=11)
    for step in range(60):
        n = 2 if step % 3 == 0 else 1
        gf, gw = fields.ask(n), weights.ask(n)
        xs = [fields.space.field(g).materialize(seeds) for g in gf]
        for x, w in zip(xs, gw):
            np.testing.assert_allclose(x, w, rtol=0, atol=1e-10)
        per_example = [{"acc": probe_scores(x)} for x in xs]
        values = [[float(p["acc"].mean())] for p in per_example]
        fields.tell(gf, values, per_example)
        weights.tell(gw, values, per_example)
        assert [m.index for m in fields.members] == [m.index for m in weights.members]
    assert fields.num_replaced > 10
    if options.get("split_granularity") == "tensor":
        assert all(fields.space.on_tensor_boundaries(m.field) for m in fields.members)
        assert all(fields.space.decode(m.genome).merge_method == "linear" for m in fields.members)


def test_state_round_trip_continues_exactly() -> None:
    seeds = seeds_matrix(3, seed=1)
    for space, options in [(fields_space(seeds), {}), (WeightsSpace(LAYOUT), {"mutation_sigma": 0.01})]:
        opt = optimizer(space, {"archive_size": 4, **options}, seed=3)

        def score(g):
            x = space.field(g).materialize(seeds) if isinstance(space, FieldsSpace) else g
            return {"acc": probe_scores(x)}

        for _ in range(15):
            gs = opt.ask(2)
            pe = [score(g) for g in gs]
            opt.tell(gs, [[p["acc"].mean()] for p in pe], pe)
        pending = opt.ask(2)  # asked, not told: the restored copy must ask the same next
        state = json.loads(json.dumps(opt.state_dict(), allow_nan=False))
        twin = optimizer(space, {"archive_size": 4, **options}, seed=3)
        twin.load_state_dict(state)
        assert json.dumps(twin.report()) == json.dumps(opt.report())
        for _ in range(5):
            a, b = opt.ask(2), twin.ask(2)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
            pe = [score(g) for g in pending]
            opt.tell(pending, [[p["acc"].mean()] for p in pe], pe)
            twin.tell(pending, [[p["acc"].mean()] for p in pe], pe)
            pending = a
        assert [m.index for m in opt.members] == [m.index for m in twin.members]
        assert opt.front().indices == twin.front().indices


def test_seeds_are_asked_first_then_children_even_before_any_tell() -> None:
    seeds = seeds_matrix(2)
    opt = optimizer(fields_space(seeds), {}, seed=0)
    first = opt.ask(3)
    assert first[0].tolist() == [1, 1, 0] and first[1].tolist() == [1, 0, 1]
    child = Field.from_genome(first[2], 2, P)  # bred uniformly from the two seeds
    assert child.num_segments <= 2
    scratch = optimizer(WeightsSpace(LAYOUT), {"mutation_sigma": 0.01, "scratch_seeds": 3}, seed=0)
    random_seeds = scratch.ask(3)
    assert all(abs(g.std() - 0.01) < 0.005 for g in random_seeds)


def test_m2n2_refuses_what_it_cannot_do() -> None:
    space = fields_space(seeds_matrix())
    problem = Problem(dim=space.dim, lower=space.lower, upper=space.upper)
    with pytest.raises(ValueError, match="fields or weights space"):
        OPTIMIZERS["m2n2"](problem, {}, 0)
    with pytest.raises(ValueError, match="cannot be mutated"):
        optimizer(space, {"mutation_sigma": 0.01})
    with pytest.raises(ValueError, match="crossover"):
        optimizer(WeightsSpace(LAYOUT), {"crossover": False})
    with pytest.raises(ValueError, match="per tensor"):
        optimizer(fields_space(seeds_matrix(), "tensor"), {"split_granularity": "element"})
    with pytest.raises(ValueError):
        WeightsSpace(FlatLayout.of({"w": 6_000_000}))


# --------------------------------------------------------------------------------------------------- spec


def spec(kind: str, algorithm: str = "m2n2", **options) -> JobSpec:
    return JobSpec.from_dict({
        "models": {"base": "b", "experts": [{"name": "e0", "path": "e0"}, {"name": "e1", "path": "e1"}]},
        "space": {"kind": kind}, "objectives": [{"name": "acc", "task": {"kind": "num_params"}}],
        "algorithm": {"name": algorithm, "options": options}})


def test_spec_pairs_m2n2_with_its_spaces() -> None:
    assert spec("fields").algorithm.options["archive_size"] == 20
    assert spec("weights", mutation_sigma=0.01).space.kind == "weights"
    with pytest.raises(SpecError, match="space.kind: fields"):
        spec("parameter")
    with pytest.raises(SpecError, match="algorithm.name: m2n2"):
        spec("fields", algorithm="cmaes")
    with pytest.raises(SpecError, match="mutation_sigma"):
        spec("fields", mutation_sigma=0.01)
    with pytest.raises(SpecError, match="split_granularity"):
        spec("fields", split_granularity="layer")
    with pytest.raises(SpecError, match="search"):
        JobSpec.from_dict({"models": {"base": "b", "experts": ["e0"]}, "space": {"kind": "fields", "search": {
            "weight": [0, 1]}}, "objectives": [{"name": "n", "task": {"kind": "num_params"}}],
            "algorithm": {"name": "m2n2"}})


def test_tensor_fields_decode_to_linear_recipes_whose_filters_hit_their_own_tensor() -> None:
    """Filters match by substring: ``mlp.weight`` is part of ``mlp.weight_x``, so longer names go first."""
    from evomerge.merging.catalog import evaluate_setting

    layout = FlatLayout.of({"lm_head.weight": 3, "layers.0.mlp.weight": 4, "layers.0.mlp.weight_x": 2})
    space = FieldsSpace(layout, SeedGram.from_seeds(np.ones((2, 9)), layout.offsets), ["e0", "e1"], base="base",
                        sources={"base": "/b", "e0": "/e0", "e1": "/e1"}, granularity="tensor")
    assert layout.offsets.tolist() == [0, 4, 6, 9]  # sorted: mlp.weight, mlp.weight_x, lm_head.weight
    field = Field(np.array([4, 6]), np.array([[1.0, 0.0], [0.5, 0.25], [0.0, 1.0]]))
    recipe = space.decode(field.genome())
    assert recipe.merge_method == "linear" and recipe.parameters == {"normalize": False}
    for s, entry in enumerate(recipe.models):
        got = [evaluate_setting(entry.parameters["weight"], name, 0.0) for name in layout.names]
        assert got == field.coefficients[:, s].tolist()
    one = space.decode(Field.seed(1, 2).genome())
    assert [m.parameters["weight"] for m in one.models] == [0.0, 1.0]
    element = space.decode(Field(np.array([5]), np.array([[1.0, 0.0], [0.0, 1.0]])).genome())
    assert element.merge_method == "piecewise_linear" and element.parameters["breaks"] == [5]


def test_weights_space_refuses_large_models_naming_the_space_kind() -> None:
    from evomerge.search.spaces.fields import SeedGeometry

    big = SeedGeometry(FlatLayout.of({"w": 1_000_001}))
    with pytest.raises(SpecError, match="1,000,000") as info:
        WeightsSpace.from_spec(spec("weights", mutation_sigma=0.01), None, geometry=big)
    assert info.value.where == "space.kind"
    small = WeightsSpace.from_spec(spec("weights"), None, geometry=SeedGeometry(LAYOUT))
    assert small.dim == P and small.decode(np.arange(P, dtype=float)).dtype == np.float32


def test_weights_space_labels_tensor_ranges_not_every_weight() -> None:
    space = WeightsSpace(LAYOUT)
    assert space.names() == ["a.bias[0:4]", "a.weight[4:16]", "b.bias[16:19]", "b.weight[19:27]"]
    assert len(WeightsSpace(FlatLayout.of({"w": 1_000_000})).names()) == 1


# ------------------------------------------------------------------------------------------ tell validation


def told(opt: M2N2) -> tuple:
    return (opt.num_told, opt.num_failed, opt.front().indices, [m.index for m in opt.members],
            json.dumps(opt.state_dict()))


def test_a_per_example_mismatch_raises_before_anything_changes() -> None:
    opt = optimizer(fields_space(seeds_matrix()), {"archive_size": 3})
    g = opt.ask(3)
    opt.tell(g[:2], [[0.5], [0.5]], [{"acc": np.array([1.0, 0.0])}, {"acc": np.array([0.0, 1.0])}])
    before = told(opt)
    with pytest.raises(ValueError, match="3 per-example scores, the archive 2"):
        opt.tell([g[2]], [[1.0]], [{"acc": np.ones(3)}])
    with pytest.raises(ValueError, match="objective"):  # a dict with another objective count
        opt.tell([g[2]], [[1.0]], [{"acc": np.ones(2), "nll": np.ones(2)}])
    with pytest.raises(ValueError, match="archive 2"):  # inside one batch: the first sets the width
        fresh = optimizer(fields_space(seeds_matrix()), {"archive_size": 3})
        fresh.tell(g[:2], [[1.0], [1.0]], [{"acc": np.ones(2)}, {"acc": np.ones(3)}])
    assert fresh.num_told == 0 and fresh.front().indices == []
    assert told(opt) == before


def test_non_finite_per_example_scores_make_a_failed_candidate() -> None:
    opt = optimizer(fields_space(seeds_matrix()), {"archive_size": 3})
    g = opt.ask(4)
    opt.tell(g[:2], [[0.5], [0.5]], [{"acc": np.array([1.0, 0.0])}, {"acc": np.array([0.0, 1.0])}])
    opt.tell(g[2:], [[0.9], [0.8]], [{"acc": np.array([np.nan, 1.0])}, {"acc": np.array([np.inf, 1.0])}])
    assert [m.index for m in opt.members] == [0, 1] and opt.num_failed == 2 and opt.num_told == 4
    assert opt.front().indices == [0]  # the 0.9 and 0.8 values of the failed ones do not count
    np.testing.assert_allclose(opt.archive_fitness(), [1.0, 1.0])


def test_objectives_are_matched_by_name_when_the_problem_names_them() -> None:
    space = fields_space(seeds_matrix())
    problem = with_space(Problem(dim=space.dim, lower=space.lower, upper=space.upper,
                                 directions=("maximize", "minimize")), space)
    if "objectives" in {f.name for f in dataclasses.fields(Problem)}:
        problem = dataclasses.replace(problem, objectives=("acc", "nll"))
    else:  # until Problem carries the spec's objective names
        object.__setattr__(problem, "objectives", ("acc", "nll"))
    opt = M2N2(problem, {"archive_size": 3}, 0)
    g = opt.ask(2)
    opt.tell(g, [[1.0, 0.0], [0.0, 0.0]], [{"nll": np.array([0.0]), "acc": np.array([1.0])},
                                           {"acc": np.array([0.0]), "nll": np.array([np.log(2)])}])
    np.testing.assert_allclose([m.scores for m in opt.members], [[1.0, 1.0], [0.0, 0.5]])
    with pytest.raises(ValueError, match="objectives are"):
        opt.tell(opt.ask(1), [[1.0, 0.0]], [{"acc": np.array([1.0]), "loss": np.array([0.0])}])


# --------------------------------------------------------------------------------------- parent selection


ARCHIVE_SCORES = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=float)  # f = [1, .5, 1.5]


def archive_of_basis_vectors(options: dict) -> tuple[M2N2, np.ndarray]:
    """Three members e_0, e_1, e_2 (orthonormal: Ω = π/2) with the hand-example scores."""
    opt = optimizer(WeightsSpace(LAYOUT), {"archive_size": 3, **options}, seed=5)
    opt.ask(opt.options.scratch_seeds)  # the seeds are out: asks breed from now on
    basis = np.eye(P)[:3]
    opt.tell(list(basis), [[s.mean()] for s in ARCHIVE_SCORES], [{"acc": s} for s in ARCHIVE_SCORES])
    return opt, basis


def test_parent_one_is_drawn_in_proportion_to_fitness() -> None:
    opt, basis = archive_of_basis_vectors({"crossover": False, "mutation_sigma": 1e-6})
    n = 3000
    p1 = np.bincount([int(np.argmax(opt.breed()[:3])) for _ in range(n)], minlength=3)
    f = fitness(ARCHIVE_SCORES, 1.0)
    np.testing.assert_allclose(p1 / n, f / f.sum(), atol=0.03)  # [1/3, 1/6, 1/2]; uniform would be 1/3 each


def test_parent_two_is_drawn_by_attraction_to_parent_one() -> None:
    """Orthogonal parents: the child lives on exactly {p1, p2}; the pair frequencies follow P(p1) · P(p2 | p1)
    with P(p2 | p1) ∝ g(p1): {0, 2}: 1/3 + 1/2 · 1/2, {0, 1}: 1/6 · 1/4, {1, 2}: 1/6 · 3/4 + 1/2 · 1/2."""
    opt, _ = archive_of_basis_vectors({"split_point": False})
    n = 3000
    pairs: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        support = tuple(int(i) for i in np.flatnonzero(np.abs(opt.breed()) > 1e-12))
        pairs[support] = pairs.get(support, 0) + 1
    assert set(pairs) <= {(0, 1), (0, 2), (1, 2)}  # p2 ≠ p1, never outside the archive
    got = [pairs.get(k, 0) / n for k in [(0, 2), (0, 1), (1, 2)]]
    np.testing.assert_allclose(got, [7 / 12, 1 / 24, 3 / 8], atol=0.03)  # p1 uniform: [.5, .083, .417]


def test_weights_state_stores_each_genome_once() -> None:
    layout = FlatLayout.of({"w": 20_000})
    space = WeightsSpace(layout)
    opt = optimizer(space, {"archive_size": 4, "mutation_sigma": 0.01}, seed=1)
    probe = np.random.default_rng(2).standard_normal((6, layout.size))
    for _ in range(12):
        g = opt.ask(1)
        s = (probe @ g[0] > 0).astype(float)
        opt.tell(g, [[s.mean()]], [{"acc": s}])
    distinct = {m.index for m in opt.members} | set(opt.front().indices)
    assert opt.front().indices[0] in {m.index for m in opt.members}  # shared, so stored once
    size = len(json.dumps(opt.state_dict()))
    per_genome = 4 * -(-layout.size * 8 // 3)  # base64 of float64
    assert len(distinct) * per_genome < size < len(distinct) * per_genome + 4096
