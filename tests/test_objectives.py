"""Every objective against its defining property, on teachers whose flow map is known in closed
form: each term is zero at the exact map and grows when the map is perturbed. Then the spec's
method sections, and each method distilling toy2d, resuming bit-identically and benched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file
from torch import Tensor, nn

from traflow_cli.grids import time_grid
from traflow_cli.objectives import OBJECTIVES, Batch
from traflow_cli.objectives.lagrangian import pair_times
from traflow_cli.objectives.shared import call_net, draw_times, mean_square, teacher_state_at
from traflow_cli.presets import resolve_spec
from traflow_cli.specs import SpecError, TraFlowSpec

MU, SIGMA = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5


class GaussianMap(nn.Module):
    """The exact flow map of the rectified flow from N(0, I) to N(mu, sigma^2 I):
    G(x, t, s) = s mu + (std_s / std_t) (x - t mu), std_t^2 = (1 - t)^2 + sigma^2 t^2, so the
    student's u = (G - x) / (s - t) (the velocity v(x, t) at s = t). `sigma` is a weight: at
    SIGMA the map is the teacher's, elsewhere it is another Gaussian's."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=torch.float64))
        self.output_layer = self  # an adaptive weighting reads output_layer.weight

    @property
    def weight(self) -> Tensor:
        return self.sigma.view(1)

    def std(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 + self.sigma**2 * t**2)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.to(x.dtype)[:, None]
        slope = (self.sigma**2 * t - (1 - t)) / self.std(t) ** 2
        return MU + slope * (x - t * MU)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        t_, s_ = t.to(x.dtype)[:, None], s.to(x.dtype)[:, None]
        h = s_ - t_
        moved = s_ * MU + self.std(s_) / self.std(t_) * (x - t_ * MU) - x
        safe = torch.where(h.abs() > 1e-7, h, torch.ones_like(h))
        return torch.where(h.abs() > 1e-7, moved / safe, self.velocity(x, t))


class StraightMap(nn.Module):
    """u(x, t, s) = b: the exact map of the straight teacher v(x, t) = B when b = B."""

    def __init__(self, b: Tensor) -> None:
        super().__init__()
        self.b = nn.Parameter(b.clone())
        self.output_layer = self

    @property
    def weight(self) -> Tensor:
        return self.b

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        return self.b.expand_as(x)


B = torch.tensor([1.5, -0.5], dtype=torch.float64)


def _batch(student: nn.Module, teacher, noise: Tensor, *, data: Tensor | None = None,
           diagonal: float = 0.0, jittered: bool = False, steps: int = 64) -> Batch:
    grid = time_grid(steps).double()
    times = draw_times(grid, len(noise), torch.Generator().manual_seed(4), jittered=jittered,
                       diagonal=diagonal)
    return Batch(student=student, online=student,
                 target=copy.deepcopy(student).requires_grad_(False), teacher=teacher,
                 noise=noise, grid=grid, times=times, data=data,
                 last_layer=student.output_layer.weight)


def _config(method: str, **fields):
    config_class = OBJECTIVES[method][0]
    return config_class(**{"teacher_solver": "heun", **fields})


def _loss(method: str, student: nn.Module, teacher, noise: Tensor, data: Tensor | None = None,
          **fields):
    config = _config(method, **{k: v for k, v in fields.items()
                                if k not in ("diagonal", "jittered")})
    batch = _batch(student, teacher, noise, data=data, diagonal=fields.get("diagonal", 0.0),
                   jittered=fields.get("jittered", False))
    return OBJECTIVES[method][1](batch, config)


NOISE = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
CASES = [("traflow", {"lambda_vel": 1.0, "vel_target": "tangent"}),
         ("traflow", {"lambda_vel": 1.0, "consistency_times": "jittered",
                      "vel_target": "tangent", "sc_inner": "online"}),
         ("ctm", {"w_dsm": 0.0}), ("ctm", {"w_dsm": 0.0, "jittered": True}),
         ("lagrangian", {"diagonal": 0.25}), ("lagrangian", {"derivative": "fd"}),
         ("eulerian", {"diagonal": 0.25}), ("eulerian", {"derivative": "fd", "adaptive_p": 0.0})]


def _ids(case: tuple) -> str:
    return case[0] + "-" + ",".join(f"{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_on_a_gaussian_teacher_every_term_vanishes_at_the_exact_map_and_grows_off_it(
        case: tuple) -> None:
    """The curved teacher: N(0, I) to N(mu, sigma^2 I). The teacher's trajectory is its 64-step
    Heun solve (states off by ~1e-4, squares ~1e-8): every term stays at that floor at the exact
    map. A central difference in the draw's float32 times is off by ~1e-4 relative (its
    documented floor)."""
    method, fields = case
    floor = 1e-6 if fields.get("derivative") == "fd" else 1e-8
    teacher = GaussianMap(SIGMA).requires_grad_(False).velocity
    exact = _loss(method, GaussianMap(SIGMA), teacher, NOISE, **fields)
    off_student = GaussianMap(0.7)
    off = _loss(method, off_student, teacher, NOISE, **fields)
    for name, value in exact.terms.items():
        if name != "lambda_vel":
            assert float(value) < floor, (name, float(value))
            assert float(off.terms[name]) > 1e-4, (name, float(off.terms[name]))
    off.total.backward()
    assert float(off_student.sigma.grad.abs()) > 0  # the loss pulls the map back


@pytest.mark.parametrize("method", ["traflow", "ctm", "lagrangian", "eulerian"])
def test_on_a_straight_teacher_every_term_vanishes_at_the_exact_map(method: str) -> None:
    """v = B everywhere: the map G(x, t, s) = x + (s - t) B, and data = noise + B, so CTM's
    denoising anchor and TraFlow's chord are exact too."""
    teacher = lambda x, t: B.expand_as(x)  # noqa: E731
    data = NOISE + B
    fields = {"ctm": {"w_dsm": 1.0}, "traflow": {"lambda_vel": 1.0, "w_fm": 1.0}}.get(method, {})
    exact = _loss(method, StraightMap(B), teacher, NOISE, data=data, **fields)
    off = _loss(method, StraightMap(torch.tensor([1.0, 0.0], dtype=torch.float64)), teacher,
                NOISE, data=data, **fields)
    for name, value in exact.terms.items():
        if name != "lambda_vel":
            assert float(value) < 1e-12, name
            assert float(off.terms[name]) > 1e-2, name


def test_the_teachers_states_between_grid_points_are_on_its_flow() -> None:
    """teacher_state_at (the Lagrangian and Eulerian x_r) and jittered consistency_states (CTM's
    and TraFlow's x_t, x_u, x_s) against the closed-form Gaussian flow from the same noise."""
    from traflow_cli.objectives.shared import consistency_states, teacher_state_at

    exact = GaussianMap(SIGMA).requires_grad_(False)
    batch = _batch(exact, exact.velocity, NOISE, jittered=True)
    trajectory = batch.teacher_trajectory("heun")
    zeros = torch.zeros(len(NOISE), dtype=torch.float64)

    def on_flow(time: Tensor) -> Tensor:
        return NOISE + time[:, None] * exact(NOISE, zeros, time)

    r = batch.times.r.double()
    x_r = teacher_state_at(exact.velocity, trajectory, batch.grid, r, "heun")
    # Heun's global error on 64 steps is ~2e-4 here; a state left at its grid point while its
    # time moved would be off by ~1e-2 (half a cell at speed ~2).
    assert float((x_r - on_flow(r)).abs().max()) < 1e-3
    x_t, t, x_u, u, x_s, s = consistency_states(trajectory, batch.grid, batch.times,
                                                teacher=exact.velocity, method="heun")
    assert bool((t < u).all()) and bool((u <= s).all())
    assert not torch.equal(t, batch.grid[batch.times.i])  # moved off the grid points
    for state, time in ((x_t, t), (x_u, u), (x_s, s)):
        assert float((state - on_flow(time)).abs().max()) < 1e-3


def test_ctm_takes_the_inner_jump_by_the_online_weights_and_carries_by_the_target() -> None:
    """Three different maps in the three roles: the loss and its gradient equal a hand-written
    CTM step, and differ from one whose inner jump uses the target EMA (the TraFlow default)."""
    from traflow_cli.objectives import ctm
    from traflow_cli.objectives.shared import consistency_states, jump

    teacher = GaussianMap(SIGMA).requires_grad_(False).velocity
    student, target = GaussianMap(0.7), GaussianMap(0.6).requires_grad_(False)
    batch = _batch(student, teacher, NOISE)
    batch.target = target
    config = ctm.CTMConfig(w_dsm=0.0)
    got = ctm.loss(batch, config)
    got.total.backward()
    x_t, t, x_u, u, _, s = consistency_states(batch.teacher_trajectory("heun"), batch.grid,
                                              batch.times)
    ones = torch.ones_like(t)
    reference = GaussianMap(0.7)
    with torch.no_grad():
        aim = jump(target, jump(reference, x_u, u, s), s, ones)
        target_inner = jump(target, jump(target, x_u, u, s), s, ones)
    end = jump(target, jump(reference, x_t, t, s), s, ones)
    want = ((end - aim) ** 2).flatten(1).mean(1).mean()
    want.backward()
    assert torch.allclose(got.total, want, rtol=1e-12)
    assert torch.allclose(student.sigma.grad, reference.sigma.grad, rtol=1e-10)
    other = ((end.detach() - target_inner) ** 2).flatten(1).mean(1).mean()
    assert abs(float(other - want.detach())) > 1e-3 * float(want.detach())


def test_ctm_pays_no_teacher_step_for_a_state_it_never_reads() -> None:
    """Jittered times move t, u and s off the grid by one teacher step each; CTM reads x_t and
    x_u but not x_s, so its step evaluates the teacher for two moves (two Heun evaluations each
    on the cached trajectory), not three, and its loss is the same as with x_s moved."""
    from traflow_cli.objectives import ctm, shared

    velocity = GaussianMap(SIGMA).requires_grad_(False).velocity
    calls = []

    def counted(x: Tensor, t: Tensor) -> Tensor:
        calls.append(len(x))
        return velocity(x, t)

    batch = _batch(GaussianMap(0.7), counted, NOISE, jittered=True)
    batch.trajectory = batch.teacher_trajectory("heun")  # the cache: solved before the step
    config = ctm.CTMConfig(w_dsm=0.0)
    calls.clear()
    got = ctm.loss(batch, config).total
    assert len(calls) == 4  # two Heun moves (of the rows whose time moved); x_s's made six
    moved_too = shared.consistency_states(batch.trajectory, batch.grid, batch.times,
                                          teacher=counted, need_s=True)
    alone = shared.consistency_states(batch.trajectory, batch.grid, batch.times, teacher=counted,
                                      need_s=False)
    assert alone[4] is None and moved_too[4] is not None
    for a, b in zip(alone[:4] + alone[5:], moved_too[:4] + moved_too[5:], strict=True):
        assert torch.equal(a, b)
    assert torch.isfinite(got)


def test_the_eulerian_target_is_the_teachers_velocity_on_the_diagonal() -> None:
    """At s = r the identity reads u(x, r, r) = v(x, r): a student that is right there and wrong
    elsewhere has zero loss on diagonal rows only."""
    teacher_map = GaussianMap(SIGMA).requires_grad_(False)

    class RightOnTheDiagonal(GaussianMap):
        def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
            return teacher_map.velocity(x, t) + (s - t).to(x.dtype)[:, None] * self.sigma

    all_diagonal = _loss("eulerian", RightOnTheDiagonal(1.0), teacher_map.velocity, NOISE,
                         diagonal=0.999999, adaptive_p=0.0)
    mixed = _loss("eulerian", RightOnTheDiagonal(1.0), teacher_map.velocity, NOISE,
                  diagonal=0.5, adaptive_p=0.0)
    assert float(all_diagonal.terms["eul"]) < 1e-20
    assert float(mixed.terms["eul"]) > 1e-3


def test_the_eulerian_tangent_warmup_starts_from_flow_matching_and_ends_at_the_identity() -> None:
    """tangent_warmup ramps the d/dr u term in: at step 0 every row's target is the teacher's
    velocity v(x_r, r), half-way it is half the term, and from the last warm-up step on the loss
    is the identity's own."""
    teacher_map = GaussianMap(SIGMA).requires_grad_(False)
    student = GaussianMap(1.0)
    config = _config("eulerian", adaptive_p=0.0)
    warm = _config("eulerian", adaptive_p=0.0, tangent_warmup=10)

    def loss_at(step: int, cfg) -> float:
        batch = _batch(student, teacher_map.velocity, NOISE, diagonal=0.25)
        batch.step = step
        return float(OBJECTIVES["eulerian"][1](batch, cfg).terms["eul"])

    batch = _batch(student, teacher_map.velocity, NOISE, diagonal=0.25)
    r, s = pair_times(batch)
    x_r = teacher_state_at(teacher_map.velocity, batch.teacher_trajectory("heun"), batch.grid, r,
                           "heun", None)
    flow_matching = mean_square(call_net(student, x_r, r, s), teacher_map.velocity(x_r, r)).detach()
    assert loss_at(0, warm) == pytest.approx(float(flow_matching), rel=1e-12)
    assert loss_at(10, warm) == loss_at(10, config) == loss_at(0, config)
    assert loss_at(5, warm) not in (pytest.approx(loss_at(0, warm)), pytest.approx(loss_at(0, config)))


def test_the_diagonal_draw_has_its_own_stream_and_its_fraction() -> None:
    """The diagonal rows come from their own generator: TraFlow's draws are unchanged by them."""
    grid = time_grid(12)
    plain = draw_times(grid, 20_000, torch.Generator().manual_seed(0))
    with_diagonal = draw_times(grid, 20_000, torch.Generator().manual_seed(0), diagonal=0.75,
                               diagonal_generator=torch.Generator().manual_seed(1))
    for name in ("i", "k", "j", "r", "s_vel", "t_fm"):
        assert torch.equal(getattr(plain, name), getattr(with_diagonal, name)), name
    assert plain.diagonal is None
    assert abs(float(with_diagonal.diagonal.double().mean()) - 0.75) < 0.02


# -- the spec ---------------------------------------------------------------------------------

def test_a_method_reads_only_its_own_section_and_an_unknown_one_names_the_choices() -> None:
    spec = resolve_spec("toy2d", ["distill.method=eulerian"])
    assert spec.distill.eulerian is not None and spec.distill.eulerian.diagonal == 0.75
    assert spec.distill.ctm is None and spec.distill.lagrangian is None
    with pytest.raises(SpecError, match="distill.method") as err:
        resolve_spec("toy2d", ["distill.method=dmd"])
    assert all(name in str(err.value) for name in ("traflow", "ctm", "lagrangian", "eulerian"))
    with pytest.raises(SpecError, match=r"distill\.ctm is set but distill\.method is 'traflow'"):
        resolve_spec("toy2d", ["distill.ctm.w_dsm=2.0"])
    with pytest.raises(SpecError, match="distill.start"):
        resolve_spec("toy2d", ["distill.method=lagrangian", "distill.start=data",
                               "distill.trajectory_cache=0"])
    with pytest.raises(SpecError, match="diagonal"):
        resolve_spec("toy2d", ["distill.method=lagrangian", "distill.lagrangian.diagonal=1.5"])
    # A setting the chosen method would ignore is refused, not dropped.
    for method in ("lagrangian", "eulerian"):
        with pytest.raises(SpecError, match=r"distill\.distance: .*set distill\.distance=l2"):
            resolve_spec("toy2d", [f"distill.method={method}", "distill.distance=pseudo_huber"])
    assert resolve_spec("toy2d", ["distill.method=ctm",
                                  "distill.distance=pseudo_huber"]).distill.distance == "pseudo_huber"


def test_traflows_settings_are_its_own_section_and_older_flat_names_still_work() -> None:
    """The preset's [distill.traflow] is the default method's: choosing another method leaves
    it out, a TraFlow setting the command itself makes under another method is refused, and the
    older flat names (distill.w_vel, in --set and in run folders' spec.json) reach the section."""
    spec = resolve_spec("toy2d", ["distill.w_vel=0.5"])
    assert spec.distill.traflow is not None and spec.distill.traflow.w_vel == 0.5
    assert resolve_spec("toy2d", ["distill.method=ctm"]).distill.traflow is None
    for key in ("distill.traflow.w_vel", "distill.w_vel"):
        with pytest.raises(SpecError, match=rf"{key}: a TraFlow setting .*method is 'ctm'"):
            resolve_spec("toy2d", ["distill.method=ctm", f"{key}=0"])
    with pytest.raises(SpecError, match="every loss weight is 0"):
        resolve_spec("toy2d", ["distill.traflow.w_out=0", "distill.w_vel=0",
                               "distill.traflow.w_sc=0"])


def test_older_flat_traflow_settings_survive_a_base_of_another_method(tmp_path: Path) -> None:
    """A TOML (or recorded spec) of another method with TraFlow's fields flat in distill: a
    command that chooses TraFlow gets those values, not the defaults."""
    toml = tmp_path / "mine.toml"
    toml.write_text('[data]\nname = "ring8"\n[net]\nkind = "mlp"\n[distill]\n'
                    'method = "ctm"\nw_vel = 0.25\nlambda_vel = 2.0\n')
    assert resolve_spec(str(toml)).distill.traflow is None
    traflow = resolve_spec(str(toml), ["distill.method=traflow"]).distill.traflow
    assert traflow is not None and (traflow.w_vel, traflow.lambda_vel) == (0.25, 2.0)


def test_a_run_recorded_before_the_method_sections_resumes_with_the_same_settings() -> None:
    """Older spec.json files have TraFlow's fields flat in distill and no eulerian.tangent_warmup:
    both read as today's defaults, so resuming such a run is not refused; a real change is."""
    from traflow_cli.specs import resume_conflicts

    for method in ("traflow", "eulerian"):
        current = resolve_spec("toy2d", [f"distill.method={method}"]).model_dump(mode="json")
        old = json.loads(json.dumps(current))
        old["distill"].update(TraFlowSpec().model_dump(mode="json"))
        old["distill"].pop("traflow")
        if method == "eulerian":
            old["distill"]["eulerian"].pop("tangent_warmup")
        assert resume_conflicts(old, current, ("distill",)) == [], method
        old["distill"]["w_sc" if method == "traflow" else "eulerian"] = (
            0.5 if method == "traflow" else {"diagonal": 0.5})
        want = "distill.traflow.w_sc" if method == "traflow" else "distill.eulerian.diagonal"
        assert resume_conflicts(old, current, ("distill",)) == [want], method


def test_the_cli_refuses_an_unknown_method_in_one_line(toy_teacher: Path, tmp_path: Path) -> None:
    result = invoke("distill", "--teacher", toy_teacher, "--out", tmp_path / "s",
                    "--set", "distill.method=meanflow")
    assert result.exit_code == 2
    line = result.output.strip().splitlines()
    assert len(line) == 1 and "distill.method" in line[0] and "eulerian" in line[0]
    assert not (tmp_path / "s").exists()


# -- end to end on toy2d --------------------------------------------------------------------

ARGS = ["--device", "cpu", "--set", "distill.batch_size=64", "--set",
        "distill.trajectory_cache=256", "--set", "distill.checkpoint_every_steps=3",
        "--set", "distill.log_every_steps=3"]


@pytest.mark.parametrize("method", ["ctm", "lagrangian", "eulerian"])
def test_each_method_distills_and_resumes_bit_identically(method: str, toy_teacher: Path,
                                                          tmp_path: Path) -> None:
    def distill(out: Path, steps: int) -> None:
        # Eulerian with its tangent warm-up crossing the resume point (the ramp reads the step).
        extra = ["--set", "distill.eulerian.tangent_warmup=4"] if method == "eulerian" else []
        result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS, "--set",
                        f"distill.method={method}", "--set", f"distill.duration_steps={steps}",
                        *extra)
        assert result.exit_code == 0, result.output

    distill(tmp_path / "whole", 6)
    distill(tmp_path / "halves", 3)
    distill(tmp_path / "halves", 6)  # resumes from step 3
    whole, halves = (load_file(tmp_path / name / "checkpoints" / "step-000000006.safetensors")
                     for name in ("whole", "halves"))
    assert whole.keys() == halves.keys()
    for key in whole:
        assert torch.equal(whole[key], halves[key]), key
    record = json.loads((tmp_path / "whole" / "spec.json").read_text())
    assert record["spec"]["distill"]["method"] == method
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    term = {"ctm": "loss_ctm", "lagrangian": "loss_lag", "eulerian": "loss_eul"}[method]
    assert all(term in m for m in metrics if "loss" in m)


def test_a_resume_with_another_method_is_refused(toy_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    first = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS,
                   "--set", "distill.duration_steps=3")
    assert first.exit_code == 0, first.output
    again = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS,
                   "--set", "distill.duration_steps=6", "--set", "distill.method=ctm")
    assert again.exit_code == 2 and "distill.method" in again.output


@pytest.mark.slow
def test_bench_times_each_methods_step(toy_teacher: Path) -> None:
    for method in ("ctm", "eulerian"):
        result = invoke("bench", "--teacher", toy_teacher, "--batch-size", "64", "--json",
                        "--set", f"distill.method={method}", "--set", "bench.rk45=false",
                        "--set", "bench.repeats=1", "--set", "bench.student_nfe=[1]",
                        "--set", "bench.teacher_steps=[1]")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)["rows"]
        trains = [r for r in rows if r["task"] == "train" and r["model"] == "student"]
        assert trains and all(r["solver"] == method and r["images_per_s"] > 0 for r in trains)


def test_runs_of_one_teacher_share_a_trajectory_cache_file(toy_teacher: Path,
                                                           tmp_path: Path) -> None:
    """distill.trajectory_cache_file: the first run solves it, a second run (another method)
    reads it as it is, and a student trained from it equals one with its own cache."""
    shared = tmp_path / "cache" / "toy.safetensors"

    def distill(out: Path, *extra: str) -> None:
        result = invoke("distill", "--teacher", toy_teacher, "--out", out, *ARGS,
                        "--set", "distill.duration_steps=3", *extra)
        assert result.exit_code == 0, result.output

    distill(tmp_path / "a", "--set", f"distill.trajectory_cache_file={shared}")
    written = shared.stat().st_mtime_ns
    distill(tmp_path / "b", "--set", f"distill.trajectory_cache_file={shared}",
            "--set", "distill.method=lagrangian")
    assert shared.stat().st_mtime_ns == written  # read, not solved again
    assert not (tmp_path / "a" / "teacher_trajectories.safetensors").exists()
    distill(tmp_path / "own")
    a, own = (load_file(tmp_path / name / "checkpoints" / "step-000000003.safetensors")
              for name in ("a", "own"))
    assert all(torch.equal(a[key], own[key]) for key in own)
    # A shared file damaged between runs (bytes flipped inside its tensors) is never trusted:
    # the next run warns, solves it again in place, and trains the same student.
    data = bytearray(shared.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    shared.write_bytes(bytes(data))
    result = invoke("distill", "--teacher", toy_teacher, "--out", tmp_path / "c", *ARGS,
                    "--set", "distill.duration_steps=3",
                    "--set", f"distill.trajectory_cache_file={shared}")
    assert result.exit_code == 0, result.output
    assert "solving the teacher's trajectories again" in result.stderr, result.stderr
    c = load_file(tmp_path / "c" / "checkpoints" / "step-000000003.safetensors")
    assert all(torch.equal(c[key], own[key]) for key in own)


def test_a_central_difference_is_refused_for_a_student_with_dropout() -> None:
    """fd differences two passes whose dropout masks differ (noise magnified ~5,000 times):
    "auto" takes forward mode for such a student, and an explicit "fd" is one clear error."""
    from traflow_cli.engine.runtime import Runtime
    from traflow_cli.jobs.distill import velocity_derivative

    cpu = Runtime(device=torch.device("cpu"))
    for method in ("traflow", "lagrangian", "eulerian"):
        spec = resolve_spec("shapes32", [f"distill.method={method}", "distill.derivative=auto"])
        assert velocity_derivative(spec.distill, cpu, 0.0) == "fd"
        assert velocity_derivative(spec.distill, cpu, 0.1) == "jvp"
        explicit = resolve_spec("shapes32", [f"distill.method={method}",
                                             "distill.derivative=fd"])
        with pytest.raises(SpecError, match="distill.derivative.*dropout 0.1"):
            velocity_derivative(explicit.distill, cpu, 0.1)
