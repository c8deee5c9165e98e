"""DDPM++/NCSN++: official layout, the student's target-time branch, forward-mode AD in s."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import RF_CIFAR10_KEYS
from torch import nn

from traflow_cli.nets.ncsnpp import NCSNpp, timestep_embedding

SMALL = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)


def randomise_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter an O(1)-effect random value (zero-initialised layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[0] if name.endswith(".W") else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def inputs(batch: int = 3, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.rand(batch, generator=gen)
    return x, t


def test_cifar10_config_matches_official_keys_shapes_and_count():
    spec = json.loads(RF_CIFAR10_KEYS.read_text())
    with torch.device("meta"):  # same names, shapes and count; no 62M-parameter init
        net = NCSNpp(
            nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
            dropout=0.15, image_size=32,
        )
    official = [(k.removeprefix("module."), shape) for k, shape in spec["keys"]]
    # The official net also carries a 1000-entry `sigmas` buffer (SMLD noise levels) that
    # Rectified Flow never reads; ours does not, and the importer drops it.
    assert official[0] == ("sigmas", [1000])
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == official[1:]
    # num_params counts parameters only: the buffer is not in it.
    num_params = sum(p.numel() for p in net.parameters())
    assert num_params == spec["num_params"] == 61_804_419
    assert sum(math.prod(s) for _, s in spec["keys"]) == num_params + 1000


def test_output_layer_is_the_final_conv_and_not_registered_twice():
    net = NCSNpp(**SMALL)
    assert net.output_layer is net.all_modules[-1]
    assert isinstance(net.output_layer, nn.Conv2d) and net.output_layer.out_channels == 3
    assert not any(k.startswith("output_layer") for k in net.state_dict())


def test_timestep_embedding_is_sin_then_cos_of_geometric_frequencies():
    t = torch.tensor([0.0, 0.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.sin(t[:, None] * freqs),
                                               torch.cos(t[:, None] * freqs)], dim=1))


def test_forward_shape_and_channels_last():
    net = randomise_(NCSNpp(**SMALL)).eval()
    x, t = inputs()
    with torch.no_grad():
        out = net(x, t)
        out_cl = net(x.to(memory_format=torch.channels_last), t)
        net_cl = net.to(memory_format=torch.channels_last)
        out_both = net_cl(x.to(memory_format=torch.channels_last), t)
    assert out.shape == x.shape
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_both, out, rtol=1e-5, atol=1e-5)


def test_student_with_teacher_weights_is_exactly_the_teacher():
    teacher = randomise_(NCSNpp(**SMALL)).eval()
    student = NCSNpp(**SMALL, target_time=True).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(k.startswith("s_embed.") for k in missing)
    x, t = inputs()
    with torch.no_grad():
        v = teacher(x, t)
        for s in (t, torch.ones_like(t), torch.zeros_like(t), torch.rand_like(t)):
            assert torch.equal(student(x, t, s), v)


def test_target_time_argument_is_required_exactly_for_students():
    x, t = inputs(batch=1)
    with pytest.raises(ValueError, match="target time"):
        NCSNpp(**SMALL, target_time=True)(x, t)
    with pytest.raises(ValueError, match="target_time=False"):
        NCSNpp(**SMALL)(x, t, t)


# torch.func.jvp's first call goes through a torch-internal torch.jit.script (not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jvp_in_s_matches_central_difference_and_backpropagates():
    student = randomise_(NCSNpp(**TINY, target_time=True), seed=3).eval()
    x, t = inputs(batch=2, size=8)
    s = torch.tensor([0.3, 0.8])

    # Float64 for the comparison, so the finite difference itself is accurate.
    net64 = student.double()
    x64, t64, s64 = x.double(), t.double(), s.double()
    with torch.no_grad():
        _, du_ds = torch.func.jvp(lambda s_: net64(x64, t64, s_), (s64,), (torch.ones_like(s64),))
        # 999 * s feeds sinusoids, so the O(h^2) error is large unless h is small.
        h = 1e-6
        fd = (net64(x64, t64, s64 + h) - net64(x64, t64, s64 - h)) / (2 * h)
    assert fd.abs().max() > 1e-1  # the randomised s-branch really depends on s
    assert ((du_ds - fd).norm() / fd.norm()).item() < 1e-5
    torch.testing.assert_close(du_ds, fd, rtol=1e-4, atol=1e-5)

    # Under autograd (float32): a loss on the tangent reaches every parameter group.
    net32 = student.float()
    _, tangent = torch.func.jvp(lambda s_: net32(x, t, s_), (s,), (torch.ones_like(s),))
    tangent.square().mean().backward()
    for name in ("s_embed.0.weight", "s_embed.2.weight", "all_modules.3.Conv_0.weight"):
        grad = net32.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_class_conditional_forward():
    net = randomise_(NCSNpp(**SMALL, num_classes=10), seed=4).eval()
    x, t = inputs(batch=2)
    x = torch.cat([x[:1], x[:1]])
    t = torch.cat([t[:1], t[:1]])
    with torch.no_grad():
        out = net(x, t, class_labels=torch.tensor([2, 7]))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[1])  # same input, different class
    assert net.class_embed.weight.shape == (10, 4 * SMALL["nf"])
    with pytest.raises(ValueError, match="needs labels"):
        net(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        NCSNpp(**SMALL)(x, t, class_labels=torch.tensor([0, 1]))


def test_fresh_class_embedding_starts_at_zero():
    """A new class-conditional net loaded with unconditional weights computes the same v."""
    base = randomise_(NCSNpp(**SMALL)).eval()
    cond = NCSNpp(**SMALL, num_classes=3).eval()
    missing, _ = cond.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["class_embed.weight"]
    x, t = inputs(batch=2)
    with torch.no_grad():
        assert torch.equal(cond(x, t, class_labels=torch.tensor([0, 2])), base(x, t))


def test_torch_compile_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; the eager backend keeps this test quick."""
    net = randomise_(NCSNpp(**SMALL, target_time=True)).eval()
    x, t = inputs(batch=2)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, t), net(x, t, t))


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    net = randomise_(NCSNpp(**SMALL, target_time=True)).eval()
    x, t = inputs(batch=2)
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, t), net(x, t, t), rtol=1e-4, atol=1e-4)
