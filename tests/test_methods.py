"""Merge methods and sparsifiers, checked against hand-computed numbers and identities."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from mergekit_lite import sparsify
from mergekit_lite.methods.base import Scope
from mergekit_lite.methods.registry import METHODS, build_registry

R2 = math.sqrt(0.5)
S3 = math.sqrt(3.0)


def T(*rows: Any) -> torch.Tensor:
    """A float32 tensor: T(1, 2) is 1-D, T([1, 2], [3, 4]) is 2-D."""
    return torch.tensor(
        rows[0] if len(rows) == 1 and isinstance(rows[0], list) else list(rows), dtype=torch.float32
    )


def merge(
    name: str,
    tensors: list[torch.Tensor],
    base_index: int | None = 0,
    rng: Any = None,
    **params: Any,
) -> torch.Tensor:
    """Call a method the way the engine does: every parameter given, defaults filled in
    (per-model defaults as lists aligned with ``tensors``, ``None`` for the base)."""
    spec = METHODS[name]
    full: dict[str, Any] = {}
    for p in spec.params:
        if p.name in params:
            full[p.name] = params[p.name]
        elif p.required:
            raise TypeError(f"test forgot required parameter {p.name}")
        elif p.scope is Scope.SHARED:
            full[p.name] = p.default
        else:
            full[p.name] = [
                None if (p.scope is Scope.NON_BASE and i == base_index) else p.default
                for i in range(len(tensors))
            ]
    return spec(tensors, base_index=base_index, rng=rng, **full)


def seeded(seed: int = 1234) -> Any:
    return lambda i: torch.Generator().manual_seed(seed + i)


# -- registry ---------------------------------------------------------------------------


def test_registry_has_exactly_the_documented_methods() -> None:
    assert set(METHODS) == {
        "linear",
        "slerp",
        "nuslerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "passthrough",
    }
    assert all(name == spec.name for name, spec in METHODS.items())


def test_build_registry_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        build_registry([METHODS["linear"], METHODS["ties"], METHODS["linear"]])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_cites_a_paper_url(name: str) -> None:
    assert METHODS[name].paper.startswith("http")


# -- linear -----------------------------------------------------------------------------


def test_linear_weighted_average() -> None:
    xs = [T(1, 2), T(3, 4), T(5, 6)]
    # 1*[1,2] + 2*[3,4] + 1*[5,6] = [12, 16]; / (1+2+1) = [3, 4]
    assert_close(merge("linear", xs, None, weight=[1.0, 2.0, 1.0]), T(3, 4))
    assert_close(merge("linear", xs, None, weight=[1.0, 2.0, 1.0], normalize=False), T(12, 16))


def test_linear_of_identical_tensors_is_the_tensor() -> None:
    x = T([0.25, -1.5], [3.0, 0.125])
    # (0.3 x + 0.7 x) / 1.0 = x
    assert_close(merge("linear", [x, x.clone()], None, weight=[0.3, 0.7]), x)


# -- slerp ------------------------------------------------------------------------------


def test_slerp_endpoints() -> None:
    v0, v1 = T(1, 2, 3), T(-2, 0.5, 1)
    # t=0: sin(theta)/sin(theta) * v0 + 0 * v1 = v0 ; t=1: 0 * v0 + v1 = v1
    assert_close(merge("slerp", [v0, v1], 0, t=0.0), v0)
    assert_close(merge("slerp", [v0, v1], 0, t=1.0), v1)


def test_slerp_orthogonal_unit_vectors_halfway() -> None:
    # theta = pi/2: sin(pi/4)/1 * [1,0] + sin(pi/4)/1 * [0,1] = [sqrt(.5), sqrt(.5)]
    assert_close(merge("slerp", [T(1, 0), T(0, 1)], 0, t=0.5), T(R2, R2))
    # t = 1/3: [sin(pi/3), sin(pi/6)] = [sqrt(3)/2, 1/2]
    assert_close(merge("slerp", [T(1, 0), T(0, 1)], 0, t=1 / 3), T(S3 / 2, 0.5))


def test_slerp_nearly_colinear_falls_back_to_lerp() -> None:
    v0, v1 = T(1, 0), T(1, 0.01)  # cos = 1/sqrt(1.0001) ~ 0.99995 > 0.9995
    out = merge("slerp", [v0, v1], 0, t=0.3)
    assert torch.equal(out, 0.7 * v0 + 0.3 * v1)  # bit-identical to the lerp formula
    assert_close(out, T(1, 0.003))  # 0.7*[1,0] + 0.3*[1,0.01]


def test_slerp_zero_norm_input_falls_back_to_lerp() -> None:
    # (1 - 0.25) * [0,0] + 0.25 * [2,4] = [0.5, 1]   (mergekit would give sin(pi/8) * v1)
    assert_close(merge("slerp", [T(0, 0), T(2, 4)], 0, t=0.25), T(0.5, 1))
    # base non-zero, other zero: 0.75 * [2,4] = [1.5, 3]
    assert_close(merge("slerp", [T(2, 4), T(0, 0)], 0, t=0.25), T(1.5, 3))


def test_slerp_base_index_one() -> None:
    other, base = T(0, 1), T(1, 0)
    assert_close(merge("slerp", [other, base], 1, t=0.0), base)
    assert_close(merge("slerp", [other, base], 1, t=1.0), other)
    # from base [1,0] towards [0,1] at t=1/3: [cos(pi/6), sin(pi/6)]
    assert_close(merge("slerp", [other, base], 1, t=1 / 3), T(S3 / 2, 0.5))


# -- nuslerp ----------------------------------------------------------------------------


def test_nuslerp_equal_weights_no_base_is_slerp_halfway() -> None:
    a, b = T([1.0, 2.0], [0.5, -1.0]), T([-1.0, 0.5], [2.0, 1.0])
    # t = w1 / (w0 + w1) = 1/2
    out = merge("nuslerp", [a, b], None, weight=[1.0, 1.0])
    assert_close(out, merge("slerp", [a, b], 0, t=0.5))
    # unequal norms, orthogonal: sin(pi/4) * ([2,0] + [0,1]) = sqrt(.5) * [2, 1]
    assert_close(merge("nuslerp", [T(2, 0), T(0, 1)], None, weight=[1.0, 1.0]), T(2 * R2, R2))


def test_nuslerp_with_base_interpolates_task_vectors() -> None:
    base, a, b = T(1, 1), T(2, 1), T(1, 3)  # deltas [1,0] and [0,2], orthogonal
    # t = 3 / (1 + 3) = 3/4, theta = pi/2:
    # base + sin(pi/8) * [1,0] + sin(3pi/8) * [0,2]
    expected = T(1 + math.sin(math.pi / 8), 1 + 2 * math.sin(3 * math.pi / 8))
    assert_close(merge("nuslerp", [base, a, b], 0, weight=[None, 1.0, 3.0]), expected)


def test_nuslerp_zero_weight_sum_uses_t_half() -> None:
    # |w0 + w1| < 1e-6 -> t = 0.5: orthogonal unit vectors -> [sqrt(.5), sqrt(.5)]
    out = merge("nuslerp", [T(1, 0), T(0, 1)], None, weight=[1.0, -1.0])
    assert_close(out, T(R2, R2))


def test_nuslerp_unflattened_uses_one_angle_per_row() -> None:
    a = T([1.0, 0.0], [2.0, 0.0])
    b = T([0.0, 1.0], [2.0, 0.0])
    # row 0: orthogonal unit vectors -> [sqrt(.5), sqrt(.5)]; row 1: colinear -> lerp [2, 0]
    out = merge("nuslerp", [a, b], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    assert_close(out, T([R2, R2], [2.0, 0.0]))
    # nuslerp_row_wise: the same along dim 0 (identity: transpose in, transpose out)
    out_t = merge(
        "nuslerp",
        [a.T.contiguous(), b.T.contiguous()],
        None,
        weight=[1.0, 1.0],
        nuslerp_flatten=False,
        nuslerp_row_wise=True,
    )
    assert_close(out_t, out.T)


# -- task arithmetic --------------------------------------------------------------------

TA_BASE, TA_1, TA_2 = T(1, 1), T(2, 3), T(0, 5)  # deltas [1,2] and [-1,4]


def test_task_arithmetic_by_hand() -> None:
    xs = [TA_BASE, TA_1, TA_2]
    # 0.5*[1,2] + 2*[-1,4] = [-1.5, 9]; + base = [-0.5, 10]
    assert_close(merge("task_arithmetic", xs, weight=[None, 0.5, 2.0]), T(-0.5, 10))
    # lambda 0.5: base + 0.5*[-1.5, 9] = [0.25, 5.5]
    assert_close(
        merge("task_arithmetic", xs, weight=[None, 0.5, 2.0], **{"lambda": 0.5}), T(0.25, 5.5)
    )
    # normalize: [-1.5, 9] / 2.5 = [-0.6, 3.6]; + base = [0.4, 4.6]
    assert_close(merge("task_arithmetic", xs, weight=[None, 0.5, 2.0], normalize=True), T(0.4, 4.6))


def test_task_arithmetic_zero_weight_gives_base() -> None:
    xs = [TA_BASE, TA_1, TA_2]
    assert torch.equal(merge("task_arithmetic", xs, weight=[None, 0.0, 0.0]), TA_BASE)
    # only the second model counts: base + 1*[-1,4] = [0, 5]
    assert_close(merge("task_arithmetic", xs, weight=[None, 0.0, 1.0]), T(0, 5))


def test_task_arithmetic_base_not_first() -> None:
    # same numbers, base at index 1
    xs = [TA_1, TA_BASE, TA_2]
    assert_close(merge("task_arithmetic", xs, 1, weight=[0.5, None, 2.0]), T(-0.5, 10))


# -- TIES -------------------------------------------------------------------------------


def test_ties_by_hand() -> None:
    base = T(0, 0, 0, 0)
    d1, d2 = T(1, -2, 3, 0.1), T(-3, 1, 2, 0.2)
    # trim (k = int(0.75*4) = 3 largest |.|): d1 -> [1,-2,3,0], d2 -> [-3,1,2,0]
    # elect sign of sum [-2,-1,5,0] -> [-,-,+,+(tie)]
    # agreeing: d1 at [1,2], d2 at [0,2]; sums [-3,-2,5,0]; counts [1,1,2,0->1]
    # normalize (ties default): [-3, -2, 2.5, 0]
    out = merge("ties", [base, d1, d2], weight=[None, 1.0, 1.0], density=[None, 0.75, 0.75])
    assert_close(out, T(-3, -2, 2.5, 0))


# d1 = [1, 2], d2 = [-2, -1], weights 3 and 1, density 1 (no trim)
ELECT = [T(0, 0), T(1, 2), T(-2, -1)]
ELECT_W = [None, 3.0, 1.0]


def test_ties_weighted_election_default() -> None:
    # g1 = [3,6], g2 = [-2,-1]; sum [1,5] -> [+,+]; only g1 agrees
    # mixed [3,6] / weights [3,3] = [1, 2]
    assert_close(merge("ties", ELECT, weight=ELECT_W), T(1, 2))
    assert_close(merge("ties", ELECT, weight=ELECT_W, election="weighted"), T(1, 2))


def test_ties_unweighted_election_differs() -> None:
    # elect on d1 + d2 = [-1, 1] -> [-,+]; entry 0: g2 agrees -> -2/1 ; entry 1: g1 -> 6/3
    assert_close(merge("ties", ELECT, weight=ELECT_W, election="unweighted"), T(-2, 2))


def test_ties_count_election() -> None:
    # three models on one entry: d = [1, -1, -1], w = [3, 1, 1]
    xs = [T(0.0), T(1.0), T(-1.0), T(-1.0)]
    w = [None, 3.0, 1.0, 1.0]
    # weighted: 3 - 1 - 1 = 1 -> + -> 3/3 = 1
    assert_close(merge("ties", xs, weight=w), T(1.0))
    # count: +1 -1 -1 = -1 -> - -> (-1 - 1)/(1 + 1) = -1
    assert_close(merge("ties", xs, weight=w, election="count"), T(-1.0))
    # count tie (one +, one -) elects +: ELECT -> g1 kept everywhere -> [3,6]/3
    assert_close(merge("ties", ELECT, weight=ELECT_W, election="count"), T(1, 2))


def test_ties_normalize_false_sums_agreeing() -> None:
    # same as test_ties_by_hand without the division: [-3, -2, 5, 0]
    out = merge(
        "ties",
        [T(0, 0, 0, 0), T(1, -2, 3, 0.1), T(-3, 1, 2, 0.2)],
        weight=[None, 1.0, 1.0],
        density=[None, 0.75, 0.75],
        normalize=False,
    )
    assert_close(out, T(-3, -2, 5, 0))


# -- DARE -------------------------------------------------------------------------------


def _dare_inputs(n: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) for _ in range(3)]


def test_dare_linear_density_one_is_task_arithmetic() -> None:
    xs = _dare_inputs()
    w = [None, 0.7, 0.4]
    out = merge("dare_linear", xs, rng=seeded(), weight=w, density=[None, 1.0, 1.0])
    assert torch.equal(out, merge("task_arithmetic", xs, weight=w))


def test_dare_ties_density_one_is_ties_without_trim() -> None:
    xs = _dare_inputs()
    w = [None, 0.7, 0.4]
    out = merge("dare_ties", xs, rng=seeded(), weight=w, density=[None, 1.0, 1.0])
    # dare_ties' default normalize is false, ties' true: set it explicitly
    ref = merge("ties", xs, weight=w, density=[None, 1.0, 1.0], normalize=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_per_seed(name: str) -> None:
    xs = _dare_inputs(256)
    kw = dict(weight=[None, 1.0, 1.0], density=[None, 0.5, 0.5])
    a = merge(name, xs, rng=seeded(1234), **kw)
    b = merge(name, xs, rng=seeded(1234), **kw)
    c = merge(name, xs, rng=seeded(99), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_keeps_about_density_fraction() -> None:
    xs = [torch.zeros(10_000), torch.ones(10_000)]
    out = merge(
        "dare_linear", xs, rng=seeded(), weight=[None, 1.0], density=[None, 0.5], rescale=False
    )
    kept = (out != 0).float().mean().item()
    assert 0.45 <= kept <= 0.55  # Binomial(10000, .5)/10000: sd 0.005
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # no rescale: survivors unchanged


def test_dare_inverse_p_divides_survivors_by_density() -> None:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    out = merge(
        "dare_linear",
        [torch.zeros(1000), delta],
        rng=seeded(),
        weight=[None, 1.0],
        density=[None, 0.3],
        rescale_norm="inverse_p",
    )
    kept = out != 0
    assert 0 < kept.sum() < 1000
    assert torch.equal(out[kept], delta[kept] / 0.3)  # delta_i / p, exactly


def test_random_drop_l1_rescale_preserves_l1_norm() -> None:
    delta = torch.randn(2000, generator=torch.Generator().manual_seed(6))
    out = sparsify.random_drop(
        delta, density=0.5, rescale_norm="l1", generator=torch.Generator().manual_seed(7)
    )
    assert (out == 0).any()
    assert math.isclose(out.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
    # survivors are all scaled by the same factor ||delta||_1 / ||masked||_1
    kept = out != 0
    ratio = out[kept] / delta[kept]
    assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


# -- sparsifiers ------------------------------------------------------------------------


def test_magnitude_keeps_top_k() -> None:
    d = T(0.5, -3, 1, 2, -0.1)
    # k = int(0.6*5) = 3: |.| ranks -3, 2, 1
    assert torch.equal(sparsify.magnitude(d, density=0.6), T(0, -3, 1, 2, 0))
    # k = int(0.59*5) = int(2.95) = 2
    assert torch.equal(sparsify.magnitude(d, density=0.59), T(0, -3, 0, 2, 0))
    # k = max(1, int(0.1*5)) = max(1, 0) = 1
    assert torch.equal(sparsify.magnitude(d, density=0.1), T(0, -3, 0, 0, 0))
    assert torch.equal(sparsify.magnitude(d, density=1.0), d)


# magnitudes 1..10 in scrambled order and signs
CRUMBS = T(3, -7, 1, 10, -2, 5, -9, 4, 6, -8)


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    # n=10, density .5, gamma .1: target 5, n_top 1 (drops |10|), n_bottom 4 (drops |1..4|)
    expected = T(0, -7, 0, 0, 0, 5, -9, 0, 6, -8)
    out = sparsify.magnitude_outliers(CRUMBS, density=0.5, gamma=0.1)
    assert torch.equal(out, expected)
    # the breadcrumbs method with base 0, weight 1 (no normalize, no rescale) is the same
    merged = merge(
        "breadcrumbs",
        [torch.zeros(10), CRUMBS],
        weight=[None, 1.0],
        density=[None, 0.5],
        gamma=[None, 0.1],
    )
    assert torch.equal(merged, expected)


def test_breadcrumbs_density_plus_gamma_over_one_keeps_density() -> None:
    # density .8, gamma .3: target 8, n_top 3, n_bottom max(0, 10-8-3) = 0
    # -> keeps the 8 smallest (|1..8|), removing only 2 outliers (|9|, |10|)
    out = sparsify.magnitude_outliers(CRUMBS, density=0.8, gamma=0.3)
    assert torch.equal(out, T(3, -7, 1, 0, -2, 5, 0, 4, 6, -8))


def test_della_magprune_keep_probabilities() -> None:
    # 4000 identical rows [1, 2, 3, 4, 5]: per-row rank -> p = .5 - .2 + .4 * (rank-1)/4
    # smallest: .3, middle: .5, largest: .7 (sd of a rate over 4000 draws ~ .008)
    rows = T(1, 2, 3, 4, 5).repeat(4000, 1)
    out = sparsify.della_magprune(
        rows, density=0.5, epsilon=0.2, generator=torch.Generator().manual_seed(0)
    )
    rate = (out != 0).float().mean(dim=0)
    assert abs(rate[0].item() - 0.3) < 0.04
    assert abs(rate[2].item() - 0.5) < 0.04
    assert abs(rate[4].item() - 0.7) < 0.04


def test_della_magprune_inverse_p() -> None:
    # row [1, 2, 3]: p = [.3, .5, .7]; a kept entry is delta_i / p_i
    d = T(1, 2, 3).repeat(200, 1)
    out = sparsify.della_magprune(
        d,
        density=0.5,
        epsilon=0.2,
        rescale_norm="inverse_p",
        generator=torch.Generator().manual_seed(1),
    )
    p = torch.tensor([0.3, 0.5, 0.7]).expand_as(d)
    kept = out != 0
    assert kept.any() and not kept.all()
    assert_close(out[kept], (d / p)[kept])


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_rejects_epsilon_outside_unit_interval(density: float, epsilon: float) -> None:
    d = T(1, 2, 3, 4)
    with pytest.raises(ValueError, match="epsilon"):
        sparsify.della_magprune(d, density=density, epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        merge(
            "della",
            [torch.zeros(4), d],
            rng=seeded(),
            weight=[None, 1.0],
            density=[None, density],
            epsilon=[None, epsilon],
        )


# -- model stock ------------------------------------------------------------------------


def test_model_stock_orthogonal_offsets_return_base() -> None:
    # offsets [1,0], [0,1]: cos 0 -> t = 0 -> base
    assert_close(merge("model_stock", [T(0, 0), T(1, 0), T(0, 1)]), T(0, 0))
    # same with a non-zero base [1,1]
    assert_close(merge("model_stock", [T(1, 1), T(2, 1), T(1, 2)]), T(1, 1))


def test_model_stock_sixty_degrees() -> None:
    # offsets [1,0], [.5, sqrt3/2]: cos .5, N=2 -> t = 2*.5/(1+.5) = 2/3
    # mean = [.75, sqrt3/4]; w_H = 2/3 * mean + 1/3 * 0 = [.5, sqrt3/6]
    out = merge("model_stock", [T(0, 0), T(1, 0), T(0.5, S3 / 2)])
    assert_close(out, T(0.5, S3 / 6))


def test_model_stock_opposite_offsets_keep_base() -> None:
    # cos -1, N=2: 1 + (N-1) cos = 0 -> no estimate -> base
    assert_close(merge("model_stock", [T(3, 4), T(4, 4), T(2, 4)]), T(3, 4))


def test_model_stock_filter_wise_per_row() -> None:
    w0 = torch.zeros(2, 2)
    w1 = T([1.0, 0.0], [1.0, 0.0])
    w2 = T([0.0, 1.0], [0.5, S3 / 2])
    # per row: row 0 orthogonal -> base [0,0]; row 1 at 60 degrees -> [.5, sqrt3/6]
    out = merge("model_stock", [w0, w1, w2], filter_wise=True)
    assert_close(out, T([0.0, 0.0], [0.5, S3 / 6]))
    # whole tensor: a=[1,0,1,0], b=[0,1,.5,sqrt3/2]: a.b=.5, |a||b|=2 -> cos .25
    # t = 2*.25/1.25 = .4; mean = [.5,.5,.75,sqrt3/4] -> [.2, .2, .3, sqrt3/10]
    out = merge("model_stock", [w0, w1, w2], filter_wise=False)
    assert_close(out, T([0.2, 0.2], [0.3, S3 / 10]))


def test_model_stock_filter_wise_bias_is_one_row() -> None:
    # a 1-D tensor is one row: same as the 60-degree case
    out = merge("model_stock", [T(0, 0), T(1, 0), T(0.5, S3 / 2)], filter_wise=True)
    assert out.shape == (2,)
    assert_close(out, T(0.5, S3 / 6))


# -- passthrough ------------------------------------------------------------------------


def test_passthrough_copies_and_scales() -> None:
    x = T([1.0, -2.0], [0.5, 4.0])
    assert torch.equal(merge("passthrough", [x], None, scale=[None]), x)
    assert torch.equal(merge("passthrough", [x], None), x)
    # 0.5 * x
    assert_close(merge("passthrough", [x], None, scale=[0.5]), T([0.5, -1.0], [0.25, 2.0]))


# -- determinism ------------------------------------------------------------------------


def _dare_ties_at(threads: int, **extra: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(256, 512, generator=g) for _ in range(3)]  # > one reduction grain
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return merge(
            "dare_ties",
            xs,
            rng=seeded(),
            weight=[None, 0.6, 0.5],
            density=[None, 0.4, 0.6],
            **extra,
        )
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "extra", [{"rescale": False}, {"rescale_norm": "inverse_p"}], ids=["no-rescale", "inverse_p"]
)
def test_dare_ties_masks_independent_of_thread_count(extra: dict[str, Any]) -> None:
    # the random masks and the element-wise arithmetic do not depend on the thread count
    assert torch.equal(_dare_ties_at(1, **extra), _dare_ties_at(2, **extra))


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_dare_ties_independent_of_thread_count(norm: str) -> None:
    # norm-matching rescale: bit-identical results across thread counts
    assert torch.equal(_dare_ties_at(1, rescale_norm=norm), _dare_ties_at(2, rescale_norm=norm))
