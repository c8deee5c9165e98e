"""EDM teachers in traflow's conventions: the Karras grid, Heun in EDM's coordinates on a field
with a known solution, the velocity's clamped ends, labels, and the student's CTM-form jump
(a fresh student is the teacher's Euler step), on small random networks of every setting."""

from __future__ import annotations

import math

import pytest
import torch

from traflow_cli.flow import (
    euler_step,
    evals_on_grid,
    heun_sigma_step,
    solve_on_grid,
)
from traflow_cli.grids import karras_grid, solver_grid, time_grid
from traflow_cli.nets import build_net, student_from_teacher
from traflow_cli.objectives.shared import jump, jump_derivative
from traflow_cli.sampling import sample_teacher
from traflow_cli.specs import EDMNetSpec

SONG = {"type": "SongUNet", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
        "attn_resolutions": [4]}
# Every setting the official files use, and the other valid SongUNet encoder/decoder types.
SETTINGS = {
    "ddpmpp-vp": ({"kind": "vp"}, {**SONG, "augment_dim": 9}, 0),
    "ncsnpp-ve-cond": ({"kind": "ve"}, {**SONG, "embedding_type": "fourier",
                                        "channel_mult_noise": 2, "encoder_type": "residual",
                                        "resample_filter": [1, 3, 3, 1], "augment_dim": 9}, 10),
    "skip-skip-edm": ({"kind": "edm"}, {**SONG, "encoder_type": "skip",
                                        "decoder_type": "skip", "channel_mult": [1, 2, 2]}, 0),
    "adm-cond": ({"kind": "edm", "sigma_data": 0.5},
                 {"type": "DhariwalUNet", "model_channels": 64, "channel_mult": [1, 2],
                  "num_blocks": 1, "attn_resolutions": [4]}, 5),
}


def edm_config(name: str) -> dict:
    precond, model, classes = SETTINGS[name]
    return {"kind": "edm", "image_size": 8, "in_channels": 3, "num_classes": classes,
            "precond": precond, "model": model}


def random_teacher(name: str) -> torch.nn.Module:
    """A teacher whose every weight is random (zero-initialised layers included)."""
    torch.manual_seed(0)
    net = build_net(edm_config(name)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def labels_for(name: str, batch: int) -> torch.Tensor | None:
    classes = SETTINGS[name][2]
    return torch.arange(batch) % classes if classes else None


def test_karras_grid_is_edms_noise_levels_as_times() -> None:
    grid = karras_grid(18, dtype=torch.float64)
    sigma = (1 - grid[:-1]) / grid[:-1]
    assert len(grid) == 19 and grid[-1] == 1.0 and bool((grid[1:] > grid[:-1]).all())
    assert sigma[0].item() == pytest.approx(80.0) and sigma[-1].item() == pytest.approx(0.002)
    # rho = 7: sigma^(1/7) falls linearly from 80^(1/7) to 0.002^(1/7).
    roots = sigma ** (1 / 7)
    step = (roots[-1] - roots[0]) / 17
    assert torch.allclose(roots[1:] - roots[:-1], step.expand(17), atol=1e-12)
    assert karras_grid(1, sigma_min=0.02, sigma_max=50.0, dtype=torch.float64).tolist() == [
        pytest.approx(1 / 51), 1.0]
    assert torch.equal(solver_grid("uniform", 7), time_grid(7))  # the rectified-flow grid


def test_heun_in_edm_coordinates_is_second_order_on_gaussian_data() -> None:
    """Data N(mu, s^2): D(y; sigma) = mu + s^2 (y - mu) / (s^2 + sigma^2), and the flow keeps
    (y - mu) / sqrt(s^2 + sigma^2) fixed, so the data end is known exactly."""
    mu, s = 0.3, 0.5
    noise = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t[:, None]
        sigma, y = (1 - tb) / tb, x / tb
        return (mu + s**2 * (y - mu) / (s**2 + sigma**2) - x) / (1 - tb)

    errors = []
    for steps in (32, 64, 128):
        grid = karras_grid(steps, dtype=torch.float64)
        sigma_max = (1 - grid[0]) / grid[0]
        x0 = (1 - grid[0]) * noise  # EDM's start: sigma_max * noise in its scale
        exact = mu + s * (sigma_max * noise - mu) / math.sqrt(s**2 + sigma_max**2)
        out = solve_on_grid(velocity, x0, grid, method="heun_sigma")
        errors.append((out - exact).abs().max().item())
    assert errors[-1] < 2e-3  # of data-end values near mu + s * noise
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5  # about 4: second order


def test_heun_sigma_needs_a_start_above_zero_and_counts_its_evaluations() -> None:
    with pytest.raises(ValueError, match="t > 0"):
        heun_sigma_step(lambda x, t: x, torch.ones(2, 1), torch.zeros(2), torch.ones(2))
    assert evals_on_grid("heun_sigma", karras_grid(18)) == 35  # EDM's 18 steps: 35 NFE
    assert evals_on_grid("heun", time_grid(18)) == 36


@pytest.mark.parametrize("name", list(SETTINGS))
def test_velocity_is_finite_everywhere_and_clamped_outside_the_files_range(name: str) -> None:
    net = random_teacher(name)
    labels = labels_for(name, 3)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ends = net(x, torch.tensor([0.0, 1.0, 0.5]), class_labels=labels)
        clamped = net(x, torch.tensor([net.t_min, net.t_max, 0.5]), class_labels=labels)
        scalar_t = net(x, torch.tensor(0.5), class_labels=labels)
    assert torch.isfinite(ends).all()
    assert torch.allclose(ends, clamped, atol=1e-6)  # t = 0 is t_min, t = 1 is t_max
    assert torch.allclose(scalar_t[2], clamped[2], atol=1e-6)


def test_class_labels_are_integers_or_edms_label_vectors() -> None:
    net = random_teacher("adm-cond")
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    labels = torch.tensor([0, 4, 2, 2])
    with torch.no_grad():
        by_index = net(x, t, class_labels=labels)
        by_vector = net(x, t, class_labels=torch.nn.functional.one_hot(labels, 5).float())
        other = net(x, t, class_labels=torch.tensor([1, 4, 2, 2]))
    assert torch.allclose(by_index, by_vector)
    assert not torch.allclose(by_index[0], other[0]) and torch.allclose(by_index[1:], other[1:])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        random_teacher("ddpmpp-vp")(x, t, class_labels=labels)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_fresh_student_jumps_as_the_teachers_euler_step(name: str) -> None:
    teacher = random_teacher(name)
    student = student_from_teacher(teacher, edm_config(name)).eval()
    extra = set(student.state_dict()) - set(teacher.state_dict())
    assert extra and all(k.startswith("model.s_embed.") for k in extra)  # never EDM's names
    x = torch.randn(4, 3, 8, 8)
    t, s = torch.tensor([0.0, 0.2, 0.5, 0.9]), torch.tensor([0.4, 0.3, 1.0, 0.97])
    labels = labels_for(name, 4)

    def teacher_v(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return teacher(x_, t_, class_labels=labels)

    with torch.no_grad():
        assert torch.equal(jump(student, x, t, s, labels), euler_step(teacher_v, x, t, s))
        assert torch.equal(jump(student, x, t, t, labels), x)
    assert student.output_layer.weight.shape[0] == 3
    derivative = jump_derivative(student, x, t, s, labels)  # forward-mode AD passes through
    assert derivative.shape == x.shape and torch.isfinite(derivative).all()


def test_a_trained_students_jump_to_the_data_end_is_a_denoiser_output() -> None:
    """CTM's form: G(x_t, t, 1) = g(x_t / t; sigma_t, sigma_s), whatever the target branch."""
    student = student_from_teacher(random_teacher("ddpmpp-vp"), edm_config("ddpmpp-vp")).eval()
    with torch.no_grad():
        for p in student.model.s_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))  # as after training
        x, t, ones = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.6]), torch.ones(2)
        tb = t[:, None, None, None]
        g = student.denoise(x / tb, (1 - t) / t, target_sigma=torch.full((2,), student.sigma_lo))
        assert torch.allclose(jump(student, x, t, ones), g, atol=1e-5)
        assert not torch.allclose(g, student.denoise(x / tb, (1 - t) / t,
                                                     target_sigma=torch.full((2,), 1.0)))


def test_rectified_flow_sampling_is_unchanged_by_the_grid_options() -> None:
    torch.manual_seed(0)
    noise = torch.randn(5, 2)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * x) - t[:, None]

    for solver in ("euler", "heun"):
        before = solve_on_grid(velocity, noise, torch.linspace(0.0, 1.0, 8), method=solver)
        after, nfe = sample_teacher(velocity, noise, solver=solver, steps=7)
        assert torch.equal(before, after) and nfe == (7 if solver == "euler" else 14)


def test_spec_section_round_trips_a_network_description() -> None:
    config = edm_config("ncsnpp-ve-cond")
    normalised = EDMNetSpec.model_validate(config).model_dump(mode="json")
    assert normalised["model"]["resample_filter"] == [1.0, 3.0, 3.0, 1.0]
    assert normalised["precond"] == {"kind": "ve", "sigma_min": 0.02, "sigma_max": 100.0}
    a, b = build_net(config), build_net(normalised)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()}
