"""The TraFlow objective: jump identities, time draws, and loss terms that vanish when they should."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from traflow_cli.flow import trajectory_on_grid
from traflow_cli.grids import time_grid
from traflow_cli.nets import build_net, student_from_teacher
from traflow_cli.objectives.shared import (
    cell_time,
    draw_times,
    jump,
    jump_derivative,
    jump_rows,
    sample_grid_indices,
)
from traflow_cli.objectives.traflow import (
    TeacherSolve,
    TraFlowConfig,
    solve_teacher,
    student_terms,
    traflow_loss,
    traflow_targets,
)

MLP = {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "time_dim": 16}


class ConstantVelocity(nn.Module):
    """u(x, t, s) = b: the straight flow x_t = noise + t b, for which TraFlow's targets are exact."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.b = nn.Parameter(b.clone())
        self.output_layer = self  # the adaptive weighting reads output_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        return self.b

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        return self.b.expand_as(x)


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = build_net(MLP).requires_grad_(False)
    return teacher, student_from_teacher(teacher, MLP)


def test_jump_to_its_own_time_is_the_identity() -> None:
    _, student = _pair()
    x, t = torch.randn(6, 2), torch.rand(6)
    assert torch.equal(jump(student, x, t, t), x)


def test_a_fresh_student_jumps_exactly_as_the_teachers_euler_step() -> None:
    teacher, student = _pair()
    x, t = torch.randn(6, 2), torch.rand(6) * 0.5
    s = t + 0.5 * torch.rand(6)
    euler = x + (s - t)[:, None] * teacher(x, t)
    assert torch.equal(jump(student, x, t, s), euler)


def test_jvp_derivative_matches_a_central_difference() -> None:
    _, student = _pair()
    student = student.double()
    with torch.no_grad():  # give the s branch some effect so du/ds is not zero
        for p in student.s_embed.parameters():
            p.normal_(0, 0.3)
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 0.5
    s = t + 0.3
    exact = jump_derivative(student, x, t, s, method="jvp")
    # The time features reach 999 rad per unit time, so the difference step must be tiny.
    approx = jump_derivative(student, x, t, s, method="fd", fd_step=1e-7)
    assert torch.allclose(exact, approx, rtol=1e-5, atol=1e-5)


def test_default_difference_step_tracks_forward_mode_in_float32() -> None:
    """derivative="fd" at its default step, in float32 (the precision it runs in), against the
    exact derivative: the step must sit between the s features' curvature and float32 rounding."""
    _, student = _pair()
    with torch.no_grad():  # an s branch as strong as the t branch: du/ds far from zero
        for p in student.s_embed.parameters():
            p.normal_(0, 0.3)
    x, t = torch.randn(256, 2), torch.rand(256) * 0.5
    s = t + 0.5 * torch.rand(256)
    exact = jump_derivative(student, x, t, s, method="jvp")
    approx = jump_derivative(student, x, t, s, method="fd")
    assert ((approx - exact).norm() / exact.norm()).item() < 5e-3  # 1e-3 would be 19% off
    # ... and its gradient in the weights is the exact one's, as L_vel trains through it.
    grads = [torch.autograd.grad(d.square().sum(), student.output_layer.weight)[0]
             for d in (exact, approx)]
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 5e-3


def test_jvp_derivative_is_differentiable_in_the_weights() -> None:
    _, student = _pair()
    x, t, s = torch.randn(5, 2), torch.zeros(5), torch.full((5,), 0.5)
    jump_derivative(student, x, t, s).square().sum().backward()
    assert student.s_embed[-1].weight.grad is not None
    assert float(student.output_layer.weight.grad.abs().sum()) > 0


def test_grid_draw_respects_ctm_constraints_and_weights_k_by_size() -> None:
    n, batch = 18, 200_000
    i, k, j = sample_grid_indices(n, batch, torch.Generator().manual_seed(0))
    assert int(k.min()) >= 1 and int(k.max()) <= n
    assert int(i.min()) >= 0 and bool((i + k <= j).all()) and int(j.max()) <= n
    freq = torch.bincount(k, minlength=n + 1)[1:].double() / batch
    expected = torch.arange(1, n + 1, dtype=torch.float64) / (n * (n + 1) / 2)
    assert torch.allclose(freq, expected, atol=3e-3)


def _straight_case(b_student: torch.Tensor, config: TraFlowConfig, grid_steps: int = 6,
                   online: nn.Module | None = None):
    b_teacher = torch.tensor([1.5, -0.5])
    teacher = lambda x, t: b_teacher.expand_as(x)  # noqa: E731
    student = ConstantVelocity(b_student)
    target = copy.deepcopy(student).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 2, generator=gen)
    data = noise + b_teacher
    grid = time_grid(grid_steps)
    times = draw_times(grid, 64, gen, jittered=config.consistency_times == "jittered")
    return traflow_loss(student, target, teacher, noise, config=config, grid=grid,
                        times=times, data=data, last_layer=student.output_layer.weight,
                        online=online)


OPTIONS = [{}, {"consistency_times": "jittered"}, {"vel_target": "tangent"},
           {"sc_inner": "online"}, {"distance": "pseudo_huber", "huber_c": 0.00054},
           {"consistency_times": "jittered", "vel_target": "tangent", "sc_inner": "online"}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_every_option_keeps_the_straight_teacher_a_fixed_point(options: dict) -> None:
    """Each option changes where the targets come from, not what the exact map satisfies: at the
    straight teacher every term is zero, and a student off it is seen by every term."""
    exact = _straight_case(torch.tensor([1.5, -0.5]), TraFlowConfig(**options))
    off = _straight_case(torch.tensor([1.0, 0.0]), TraFlowConfig(**options))
    for name in ("out", "sc", "vel"):
        assert float(exact.terms[name]) < 1e-10, name
        assert float(off.terms[name]) > 1e-4, name


class ExponentialMap(nn.Module):
    """The exact flow map of the curved teacher v(x, t) = a x: G(x, t, s) = x e^(a (s - t)), so
    u(x, t, s) = x (e^(a (s - t)) - 1) / (s - t) (a x at s = t)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.output_layer = self

    @property
    def weight(self) -> torch.Tensor:
        return self.a.view(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None):
        h = (s - t).view(-1, 1)
        safe = torch.where(h.abs() > 1e-6, h, torch.ones_like(h))
        return torch.where(h.abs() > 1e-6, x * torch.expm1(self.a * h) / safe, self.a * x)


def _curved_case(student_a: float, **options):
    a = 0.8
    teacher = lambda x, t: a * x  # noqa: E731
    student = ExponentialMap(student_a)
    target = copy.deepcopy(student).requires_grad_(False)
    grid, noise = time_grid(64), torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    config = TraFlowConfig(lambda_vel=1.0, **options)
    times = draw_times(grid, 256, torch.Generator().manual_seed(4),
                       jittered=config.consistency_times == "jittered")
    return traflow_loss(student, target, teacher, noise, config=config, grid=grid, times=times)


def test_on_a_curved_teacher_the_tangent_target_holds_at_the_exact_map_and_the_chord_does_not():
    """v = a x curves: the exact map meets the tangent condition dG/ds = v(G, s) wherever it
    starts, while the chord x_hat - noise is a straight line the map does not follow."""
    tangent = _curved_case(0.8, vel_target="tangent")
    chord = _curved_case(0.8, vel_target="chord")
    assert float(tangent.terms["vel"]) < 1e-9
    assert float(chord.terms["vel"]) > 1e-3
    assert float(_curved_case(0.5, vel_target="tangent").terms["vel"]) > 1e-3


def test_on_a_curved_teacher_jittered_times_pair_each_state_with_its_own_time():
    """Off the grid, x_t, x_u and x_s are the teacher's states at the moved times (one Heun step
    from the grid state, error ~h^3): the exact map meets L_out and L_sc to that accuracy. A
    state left at its grid point while its time moved would be off by ~h (loss ~1e-4)."""
    exact = _curved_case(0.8, consistency_times="jittered")
    for name in ("out", "sc"):
        assert float(exact.terms[name]) < 1e-8, name
    off = _curved_case(0.6, consistency_times="jittered")
    assert float(off.terms["out"]) > 1e-5


def test_the_online_inner_jump_moves_the_sc_target_and_the_ema_one_does_not() -> None:
    """sc_inner="online": G(Phi(x_t, t -> u), u, s) by the online weights (CTM), so a target
    network that lags the student changes L_sc's target only through the carry to the data end."""
    lagging = ConstantVelocity(torch.tensor([1.0, 0.0])).requires_grad_(False)
    teacher, grid = (lambda x, t: torch.tensor([1.5, -0.5]).expand_as(x)), time_grid(6)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    times = draw_times(grid, 64, torch.Generator().manual_seed(2))
    solve = solve_teacher(teacher, noise, grid, times, config=TraFlowConfig())
    online = ConstantVelocity(torch.tensor([1.5, -0.5]))
    ends = {}
    for inner in ("target", "online"):
        ends[inner] = traflow_targets(lagging, solve, noise, grid, times,
                                      config=TraFlowConfig(sc_inner=inner), online=online).end_sc
    assert not torch.allclose(ends["target"], ends["online"])
    # With the online inner jump, the sc target is the out target (the online map is exact).
    out = traflow_targets(lagging, solve, noise, grid, times, config=TraFlowConfig())
    assert torch.allclose(ends["online"], out.end_out, atol=1e-6)


def test_every_term_vanishes_when_the_student_is_the_straight_teacher() -> None:
    config = TraFlowConfig(w_fm=1.0)
    loss = _straight_case(torch.tensor([1.5, -0.5]), config)
    assert set(loss.terms) == {"out", "sc", "vel", "fm", "lambda_vel"}
    for name in ("out", "sc", "vel", "fm"):
        assert float(loss.terms[name]) < 1e-10, name


def test_every_term_sees_a_student_that_is_off_the_teacher() -> None:
    loss = _straight_case(torch.tensor([1.0, 0.0]), TraFlowConfig(w_fm=1.0))
    for name in ("out", "sc", "vel", "fm"):
        assert float(loss.terms[name]) > 1e-3, name
    lam = float(loss.terms["lambda_vel"])
    assert 0.01 <= lam <= 10.0
    loss.backward()


@pytest.mark.parametrize("off", ["w_out", "w_vel", "w_sc"])
def test_a_term_with_weight_zero_is_not_logged_and_leaves_the_total(off: str) -> None:
    config = TraFlowConfig(**{off: 0.0}, lambda_vel=1.0)
    loss = _straight_case(torch.tensor([1.0, 0.0]), config)
    assert off.removeprefix("w_") not in loss.terms
    kept = sum(float(v) for k, v in loss.terms.items() if k != "lambda_vel")
    assert float(loss.total.detach()) == pytest.approx(kept, rel=1e-6)


def test_switching_terms_off_skips_their_network_passes() -> None:
    """w_vel = 0 drops the derivative's pass of the student; w_sc = 0 drops L_sc's inner jump
    and its carry (so G^- sees fewer rows); w_out = w_sc = 0 drops the jump and every G^- pass: a
    weight of zero saves its cost, not only its gradient."""
    teacher, student, target = _off_teacher_student()
    grid, noise = time_grid(6), torch.randn(32, 2)
    times = draw_times(grid, 32, torch.Generator().manual_seed(9))
    calls = {"student": 0, "target": 0, "target_rows": 0}
    student.register_forward_pre_hook(lambda m, a: calls.__setitem__("student", calls["student"] + 1))
    target.register_forward_pre_hook(lambda m, a: calls.update(
        target=calls["target"] + 1, target_rows=calls["target_rows"] + len(a[0])))

    def passes(**weights: float) -> dict[str, int]:
        calls.update(student=0, target=0, target_rows=0)
        loss = traflow_loss(student, target, teacher, noise, config=TraFlowConfig(**weights),
                            grid=grid, times=times, last_layer=student.output_layer.weight)
        return {**calls, "out": float(loss.terms.get("out", float("nan")))}

    every = passes()
    assert passes(w_vel=0.0)["student"] == every["student"] - 1
    out_alone = passes(w_sc=0.0)
    assert out_alone["target_rows"] < every["target_rows"]
    assert out_alone["out"] == every["out"]  # the same L_out, for less work
    no_consistency = passes(w_out=0.0, w_sc=0.0)
    assert {k: no_consistency[k] for k in ("student", "target", "target_rows")} == \
        {"student": 1, "target": 0, "target_rows": 0}


def test_cached_teacher_trajectory_gives_the_same_loss_as_solving_it() -> None:
    teacher, student = _pair()
    target = copy.deepcopy(student).requires_grad_(False)
    config, grid = TraFlowConfig(), time_grid(5)
    noise = torch.randn(16, 2)
    times = draw_times(grid, 16, torch.Generator().manual_seed(3))
    cached = trajectory_on_grid(teacher, noise, torch.zeros(16, dtype=torch.long), grid)
    a = traflow_loss(student, target, teacher, noise, config=config, grid=grid, times=times)
    b = traflow_loss(student, target, teacher, noise, config=config, grid=grid, times=times,
                     trajectory=cached)
    for name in ("out", "sc", "vel"):
        assert torch.allclose(a.terms[name], b.terms[name]), name


def test_data_start_and_a_fixed_lambda_weigh_the_terms_as_given() -> None:
    teacher, student = _pair()
    target = copy.deepcopy(student).requires_grad_(False)
    config = TraFlowConfig(start="data", w_fm=0.5, lambda_vel=2.0, distance="pseudo_huber",
                           derivative="fd")
    gen, grid = torch.Generator().manual_seed(1), time_grid(5)
    loss = traflow_loss(student, target, teacher, torch.randn(16, 2), config=config, grid=grid,
                        times=draw_times(grid, 16, gen), data=torch.randn(16, 2))
    assert float(loss.terms["lambda_vel"]) == 2.0
    # A fixed lambda weighs L_vel as given: total = out + sc + 2 vel + 0.5 fm.
    t = loss.terms
    assert float(loss.total.detach()) == pytest.approx(
        float(t["out"] + t["sc"] + 2.0 * t["vel"] + 0.5 * t["fm"]), rel=1e-6)
    student.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_every_traflow_config_field_is_a_spec_field_with_the_same_default() -> None:
    """Each TraFlowConfig field is distill.traflow's (TraFlow's own) or distill's (the engine's),
    never both, with the same default; older flat names still reach TraFlow's section."""
    from traflow_cli.jobs.distill import traflow_config
    from traflow_cli.specs import DistillSpec, TraFlowSpec

    engine, own = DistillSpec.model_fields, TraFlowSpec.model_fields
    assert not set(engine) & set(own)
    for f in dataclasses.fields(TraFlowConfig):
        fields = own if f.name in own else engine
        assert f.name in fields, f"TraFlowConfig.{f.name} is neither distill.traflow's nor distill's"
        assert fields[f.name].default == f.default, f.name
    assert traflow_config(DistillSpec()) == TraFlowConfig()
    want = TraFlowConfig(w_vel=0.5, lambda_vel=2.0, teacher_solver="euler", lambda_clip=(0.1, 3))
    changed = DistillSpec(traflow={"w_vel": 0.5, "lambda_vel": 2.0, "lambda_clip": (0.1, 3)},
                          teacher_solver="euler")
    flat = DistillSpec(w_vel=0.5, lambda_vel=2.0, teacher_solver="euler", lambda_clip=(0.1, 3))
    assert traflow_config(changed) == traflow_config(flat) == want
    assert flat == changed


def test_the_teacher_side_needs_no_gradient_and_the_student_side_makes_the_loss() -> None:
    teacher, student = _pair()
    target = copy.deepcopy(student).requires_grad_(False)
    config, grid = TraFlowConfig(w_fm=0.5), time_grid(5)
    noise, data = torch.randn(16, 2), torch.randn(16, 2)
    times = draw_times(grid, 16, torch.Generator().manual_seed(4))
    solve = solve_teacher(teacher, noise, grid, times, config=config)
    targets = traflow_targets(target, solve, noise, grid, times, config=config, data=data)
    no_grad = [v for v in vars(targets).values() if isinstance(v, torch.Tensor)]
    assert len(no_grad) == 13 and not any(v.requires_grad for v in no_grad)
    last = student.output_layer.weight
    torch.manual_seed(0)
    split = student_terms(student, target, targets, config=config, last_layer=last)
    torch.manual_seed(0)
    whole = traflow_loss(student, target, teacher, noise, config=config, grid=grid, times=times,
                         data=data, last_layer=last)
    assert torch.equal(split.total, whole.total) and split.total.requires_grad
    assert split.terms.keys() == whole.terms.keys() == {"out", "sc", "vel", "fm", "lambda_vel"}


def test_a_grid_that_starts_above_zero_bounds_every_time_and_starts_the_solve_there() -> None:
    teacher, student = _pair()
    target = copy.deepcopy(student).requires_grad_(False)
    grid = torch.linspace(0.2, 1.0, 7)
    config = TraFlowConfig(w_fm=0.5)
    times = draw_times(grid, 4096, torch.Generator().manual_seed(5))
    for name in ("r", "s_vel", "t_fm"):
        value = getattr(times, name)
        assert float(value.min()) >= 0.2 and float(value.max()) <= 1.0, name
    assert float(times.r.min()) < 0.21 and float(times.t_fm.min()) < 0.21  # the whole range
    noise = torch.randn(4096, 2)
    solve = solve_teacher(teacher, noise, grid, times, config=config)
    assert solve.trajectory.shape == (7, 4096, 2)
    assert torch.equal(solve.trajectory[0], 0.8 * noise)  # (1 - grid[0]) * noise at grid[0]
    targets = traflow_targets(target, solve, noise, grid, times, config=config,
                              data=torch.randn(4096, 2))
    assert float(targets.t.min()) >= 0.2 and float(targets.s.max()) == 1.0
    loss = student_terms(student, target, targets, config=config,
                         last_layer=student.output_layer.weight)
    assert torch.isfinite(loss.total)


# draw_times(time_grid(9), 5, seed 6) as every earlier version drew it: a resumed or repeated
# run must see the same times, so a change to the draw (or to what it draws first) shows here.
RECORDED_DRAW = {
    "i": [0, 0, 0, 3, 0], "k": [7, 9, 9, 6, 7], "j": [9, 9, 9, 9, 7],
    "r": [0.164204, 0.28332, 0.385819, 0.833748, 0.617322],
    "s_vel": [0.492113, 0.417914, 0.900174, 0.868811, 0.781167],
    "t_fm": [0.497916, 0.034987, 0.883815, 0.095599, 0.77966],
}


@pytest.mark.parametrize("jittered", [False, True])
def test_a_uniform_grid_draws_what_it_always_drew(jittered: bool) -> None:
    """The grid's first time enters the draw only above 0, and the jitter is drawn last: runs
    made before either are unchanged."""
    times = draw_times(time_grid(9), 5, torch.Generator().manual_seed(6), jittered=jittered)
    for name, recorded in RECORDED_DRAW.items():
        value = getattr(times, name)
        assert torch.allclose(value.double(), torch.tensor(recorded, dtype=torch.float64),
                              atol=1e-6), name
    assert (times.jitter is not None) == jittered


@pytest.mark.parametrize("grid", [time_grid(12), torch.linspace(0.05, 1.0, 9) ** 1.5])
def test_jittered_times_stay_in_their_cells_and_in_order(grid: torch.Tensor) -> None:
    """Interior points move within the cell between the midpoints with their neighbours; the
    first and last points stay; t < u <= s survives, and u = s where they shared a grid point."""
    times = draw_times(grid, 20_000, torch.Generator().manual_seed(11), jittered=True)
    i, u_index, j = times.i, times.i + times.k, times.j
    t, u = cell_time(grid, i, times.jitter[0]), cell_time(grid, u_index, times.jitter[1])
    s = torch.where(u_index == j, u, cell_time(grid, j, times.jitter[2]))
    assert bool((t < u).all()) and bool((u <= s).all())
    assert torch.equal(t[i == 0], grid[0].expand(int((i == 0).sum())))
    assert bool((s[j == len(grid) - 1] == 1.0).all())
    inner = (i > 0) & (i < len(grid) - 1)
    mid_low = (grid[i - 1] + grid[i]) / 2
    mid_high = (grid[i] + grid[(i + 1).clamp(max=len(grid) - 1)]) / 2
    assert bool((t[inner] >= mid_low[inner]).all()) and bool((t[inner] < mid_high[inner]).all())
    # The grid points themselves are hit with probability 0: the student sees continuous times.
    assert int(torch.isin(t[inner], grid).sum()) == 0


def test_a_jump_to_its_own_time_skips_the_network_and_passes_gradients_unchanged() -> None:
    _, student = _pair()
    x = torch.randn(8, 2, requires_grad=True)
    t = torch.rand(8) * 0.5
    s = torch.where(torch.arange(8) % 3 == 0, t, t + 0.4)  # rows 0, 3, 6 jump nowhere
    rows = torch.nonzero(s != t).squeeze(1)
    calls: list[int] = []
    student.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    skipped = jump_rows(student, x, t, s, rows=rows)
    assert calls == [5]
    assert torch.allclose(skipped, jump(student, x, t, s), rtol=1e-6, atol=1e-7)
    assert torch.equal(skipped[s == t], x[s == t].detach())
    (grad,) = torch.autograd.grad(skipped.sum(), x)
    assert torch.equal(grad[s == t], torch.ones(3, 2))


def _off_teacher_student() -> tuple[nn.Module, nn.Module, nn.Module]:
    teacher, student = _pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student, copy.deepcopy(student).requires_grad_(False)


def _gradients(student: nn.Module, loss) -> list[torch.Tensor]:
    student.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in student.parameters()]


def test_adaptive_lambda_and_its_shared_backward_equal_the_plain_gradients() -> None:
    """lambda = ||grad consistency|| / ||grad L_vel|| on the last layer, and loss.backward()
    (which reuses the consistency gradient lambda took) equals the gradient of the total."""
    teacher, student, target = _off_teacher_student()
    grid, noise = time_grid(6), torch.randn(64, 2)
    times = draw_times(grid, 64, torch.Generator().manual_seed(7))

    def loss_with(lambda_vel: float | str):
        torch.manual_seed(0)
        return traflow_loss(student, target, teacher, noise, config=TraFlowConfig(
            lambda_vel=lambda_vel, lambda_clip=(1e-4, 1e4)), grid=grid, times=times,
            last_layer=student.output_layer.weight)

    adaptive = loss_with("adaptive")
    lam = float(adaptive.terms["lambda_vel"])
    got = _gradients(student, adaptive)
    # With a fixed lambda the total is differentiated plainly: grad = g_cons + lambda * g_vel.
    one, two = _gradients(student, loss_with(1.0)), _gradients(student, loss_with(2.0))
    last = [n for n, _ in student.named_parameters()].index("output_layer.weight")
    g_vel = two[last] - one[last]
    g_cons = one[last] - g_vel
    assert lam == pytest.approx(float(g_cons.norm() / g_vel.norm()), rel=1e-4)
    for a, b1, b2 in zip(got, one, two, strict=True):
        assert torch.allclose(a, b1 + (lam - 1.0) * (b2 - b1), rtol=1e-4, atol=1e-7)


def test_total_backward_is_the_loss_gradient_with_the_adaptive_lambda() -> None:
    """The adaptive lambda takes the consistency gradient once and frees G^-'s graph; the total
    still has the loss's value and `loss.total.backward()` its gradient, as `loss.backward()`."""
    teacher, student, target = _off_teacher_student()
    grid, noise = time_grid(6), torch.randn(64, 2)
    times = draw_times(grid, 64, torch.Generator().manual_seed(7))

    def loss():
        torch.manual_seed(0)
        return traflow_loss(student, target, teacher, noise, config=TraFlowConfig(), grid=grid,
                            times=times, last_layer=student.output_layer.weight)

    first = loss()
    lam = float(first.terms["lambda_vel"])
    value = sum(float(first.terms[k]) for k in ("out", "sc")) + lam * float(first.terms["vel"])
    assert float(first.total.detach()) == pytest.approx(value, rel=1e-6)
    student.zero_grad(set_to_none=True)
    first.total.backward()
    by_total = torch.cat([p.grad.flatten() for p in student.parameters()])
    # The same loss with that lambda fixed has no freed graph: its plain gradient is the truth.
    torch.manual_seed(0)
    plain = traflow_loss(student, target, teacher, noise, config=TraFlowConfig(lambda_vel=lam),
                         grid=grid, times=times, last_layer=student.output_layer.weight)
    reference = torch.cat([g.flatten() for g in _gradients(student, plain)])
    assert torch.allclose(by_total, reference, rtol=1e-5, atol=1e-8)


def test_vel_every_puts_the_velocity_term_on_every_nth_row_of_the_global_batch() -> None:
    teacher, student, target = _off_teacher_student()
    grid, noise = time_grid(6), torch.randn(64, 2)
    times = draw_times(grid, 64, torch.Generator().manual_seed(8), vel_every=4)
    assert torch.equal(times.vel, torch.arange(64) % 4 == 0)
    # A process's share keeps the global rule, so N processes compute what one does.
    assert torch.equal(times.rows(slice(32, 64)).vel, torch.arange(32) % 4 == 0)
    sizes: list[int] = []
    handle = student.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    config = TraFlowConfig(vel_every=4, w_out=0.0, w_sc=0.0)
    loss = traflow_loss(student, target, teacher, noise, config=config, grid=grid, times=times)
    handle.remove()
    assert sizes == [16]  # one jvp, on rows 0, 4, ..., 60
    every_row = traflow_targets(target, TeacherSolve.cached(trajectory_on_grid(
        teacher, noise, torch.zeros(64, dtype=torch.long), grid)), noise, grid,
        draw_times(grid, 64, torch.Generator().manual_seed(8)), config=TraFlowConfig())
    d_jump = jump_derivative(student, every_row.x_r, every_row.r, every_row.s_vel)
    per_row = ((d_jump - every_row.chord_velocity) ** 2).mean(1)
    assert torch.allclose(loss.terms["vel"], per_row[::4].mean(), rtol=1e-5)


@pytest.mark.parametrize("runtime_change", [{"tf32": True}, {"amp_dtype": torch.bfloat16}])
def test_a_central_difference_only_where_the_network_runs_in_full_float32(
        runtime_change: dict) -> None:
    """"fd" is refused where bf16 autocast or TF32 would round the network (a CUDA run), with one
    line naming the field, before the teacher's trajectories are solved; "auto" takes forward
    mode there and the difference on a float32 CPU run."""
    from traflow_cli.engine.runtime import Runtime
    from traflow_cli.jobs.distill import build_distill_step
    from traflow_cli.presets import resolve_spec
    from traflow_cli.specs import SpecError

    teacher = build_net(resolve_spec("toy2d").net_config())
    cpu = Runtime(device=torch.device("cpu"))
    rounding = dataclasses.replace(cpu, **runtime_change)

    def build(derivative: str, runtime: Runtime) -> str:
        spec = resolve_spec("toy2d", [f"distill.derivative={derivative}",
                                      "distill.trajectory_cache=4"])
        return build_distill_step(spec, runtime, teacher, cache_file=None).derivative

    with pytest.raises(SpecError, match=r"^distill\.derivative: .*runtime\.precision=fp32"):
        build("fd", rounding)
    assert build("auto", rounding) == "jvp"
    assert (build("fd", cpu), build("auto", cpu), build("jvp", cpu)) == ("fd", "fd", "jvp")


def test_draws_per_solve_shares_one_teacher_solve_among_k_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """distill.draws_per_solve = K: the step solves the teacher for B / K noises, and the K rows
    of each read its trajectory with their own times; K = 1 solves every row."""
    from traflow_cli.engine.runtime import Runtime
    from traflow_cli.jobs import distill
    from traflow_cli.jobs.bench import count_evaluations
    from traflow_cli.presets import resolve_spec

    teacher = build_net(resolve_spec("toy2d").net_config()).requires_grad_(False)
    seen: list[tuple] = []  # (noise, trajectory, times) of each loss call
    config_class, real_loss = distill.OBJECTIVES["traflow"]

    def recording_loss(batch, config):
        seen.append((batch.noise, batch.trajectory, batch.times))
        return real_loss(batch, config)

    monkeypatch.setitem(distill.OBJECTIVES, "traflow", (config_class, recording_loss))

    evals = {}
    for k in (1, 4):
        spec = resolve_spec("toy2d", [f"distill.draws_per_solve={k}", "distill.batch_size=32",
                                      "distill.grid_steps=6", "distill.trajectory_cache=0"])
        step = distill.build_distill_step(spec, Runtime(device=torch.device("cpu")), teacher,
                                          cache_file=None)
        with count_evaluations({"teacher": teacher}, batch=32) as counts:
            metrics = step.step_fn(0)
        assert torch.isfinite(metrics["loss"])
        evals[k] = counts["teacher"]
    assert evals == {1: 12.0, 4: 3.0}  # Heun: two evaluations per grid step, per solve
    assert step.draws_per_solve == 4
    noise, trajectory, times = seen[-1]
    assert trajectory.shape[1] == 32 and torch.equal(trajectory[0], noise)
    groups = noise.reshape(8, 4, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))  # 4 rows, one noise
    assert not torch.equal(times.j.reshape(8, 4), times.j.reshape(8, 4)[:, :1].expand(8, 4))
    assert seen[0][1] is None  # K = 1: solved inside the loss, every row its own noise
