"""Everything that works with torch.nn's layers works with ours: torch.compile without
graph breaks, torch.export, FX, torch.jit.trace, torch.func, autocast and the profiler,
each checked against the same model built from torch.nn layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm


def _model() -> nn.Module:
    """Every family in one small network: BN with channels-last-friendly convs, GN, IN,
    LN, and a BN1d head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True,
                                                         track_running_stats=True),
        nn.Flatten(), nn.LayerNorm(8 * 6 * 6), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16),
        nn.Linear(16, 4))


def _pair() -> tuple[nn.Module, nn.Module]:
    reference = _model()
    ours = batchnorm.convert(copy.deepcopy(reference))
    return reference, ours


def _input(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _assert_states_close(ours: nn.Module, reference: nn.Module, **tol: float) -> None:
    """Every tensor of ``ours`` (a traced module keeps only those its graph uses) equals the
    reference's of the same name."""
    expected = reference.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name, **tol)


TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("decompose", [True, False], ids=["decomposed", "operators"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_torch_nn_with_no_graph_breaks(training, decompose,
                                                                 monkeypatch):
    """Both ways to compile: plain layers as traceable torch ops (the default, which
    Inductor fuses), or every layer as our operators."""
    monkeypatch.setattr(batchnorm.functional, "DECOMPOSE_UNDER_COMPILE", decompose)
    reference, ours = _pair()
    reference.train(training)
    ours.train(training)
    x = _input()
    explanation = torch._dynamo.explain(copy.deepcopy(ours))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    targets = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    # InstanceNorm (chunks of one sample) is a variant: an operator either way
    assert ("batchnorm.batch_norm.default" in targets) is True
    assert ("batchnorm.layer_norm.default" in targets) is not decompose
    _assert_compiled_matches(ours, reference, x, training)


def _assert_compiled_matches(ours: nn.Module, reference: nn.Module, x: torch.Tensor,
                             training: bool) -> None:
    """``ours`` compiled with fullgraph=True against eager ``reference`` over two steps:
    outputs, buffers and (training) parameter gradients."""
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # running statistics over two steps
        y_ours, y_ref = compiled(x), reference(x)
        torch.testing.assert_close(y_ours, y_ref, **TOL)
        if training:
            y_ours.square().sum().backward()
            y_ref.square().sum().backward()
    _assert_states_close(ours, reference, **TOL)
    if training:
        for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(),
                                     strict=True):
            torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("decompose", [True, False], ids=["decomposed", "operators"])
def test_compiled_fused_activations_match_torch_nn(decompose, monkeypatch):
    """convert(fuse_activations=True): the BatchNorm -> ReLU pair is one layer, which
    compiles without breaks both ways."""
    monkeypatch.setattr(batchnorm.functional, "DECOMPOSE_UNDER_COMPILE", decompose)
    reference = _model()
    ours = batchnorm.convert(copy.deepcopy(reference), fuse_activations=True)
    assert (ours[1].activation, type(ours[2])) == ("relu", nn.Identity)
    _assert_compiled_matches(ours, reference, _input(), training=True)


def test_export_is_told_from_the_flag_not_is_exporting(monkeypatch):
    """Dynamo before torch 2.13 folds ``torch.compiler.is_exporting()`` to True under
    torch.compile too, which kept our operators in compiled graphs (on torch 2.11 a
    converted ResNet-18 ran as slowly compiled as eager); the decision reads the flag."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not batchnorm.functional._exporting()
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    assert batchnorm.functional._exporting()


def test_inductor_compiles_a_converted_training_step():
    """The default (decomposed) path under Inductor, buffers included."""
    reference, ours = _pair()
    x = _input()
    compiled = torch.compile(ours, fullgraph=True)
    y_ours, y_ref = compiled(x), reference(x)
    torch.testing.assert_close(y_ours, y_ref, **TOL)
    y_ours.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(ours[0].weight.grad, reference[0].weight.grad, rtol=1e-3,
                               atol=1e-4)
    _assert_states_close(ours, reference, **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_matches_torch_nn_and_updates_buffers_in_training(training):
    reference, ours = _pair()
    reference.train(training)
    ours.train(training)
    x = _input()
    program = torch.export.export(ours, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "batchnorm.batch_norm.default" in targets
    exported = program.module()
    torch.testing.assert_close(exported(x), reference(x), **TOL)
    if training:
        decomposed = program.run_decompositions()
        mutated = set(decomposed.graph_signature.buffers_to_mutate.values())
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= mutated


def test_fx_symbolic_trace_records_one_node_per_layer():
    reference, ours = _pair()
    traced = torch.fx.symbolic_trace(ours)
    calls = [node for node in traced.graph.nodes if node.op == "call_function"]
    assert {node.target.__name__ for node in calls} >= {"batch_norm", "group_norm",
                                                        "layer_norm"}
    x = _input()
    torch.testing.assert_close(traced(x), reference(x), **TOL)
    _assert_states_close(traced, reference, **TOL)


def test_jit_trace_of_an_eval_model_saves_and_loads(tmp_path):
    reference, ours = _pair()
    reference.eval()
    ours.eval()
    x = _input()
    traced = torch.jit.trace(ours, x)
    traced.save(tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    torch.testing.assert_close(loaded(x), reference(x), **TOL)


def _train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward with a fixed output gradient; the output."""
    for parameter in model.parameters():
        parameter.grad = None
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach()


def _assert_grads_close(ours: nn.Module, reference: nn.Module, **tol: float) -> None:
    expected = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name].grad, msg=name, **tol)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_jit_script_matches_scripted_torch_nn_over_training_steps_and_saves(tmp_path,
                                                                            memory_format):
    """Scripted layers call our operators (not Python) and follow torch.nn's scripted ones
    in outputs, gradients and running statistics, then in eval, also after save and load."""
    reference, ours = (torch.jit.script(model.to(memory_format=memory_format))
                       for model in _pair())
    for index in (1, 4, 7, 9, 11):
        assert "batchnorm::" in str(getattr(ours, str(index)).inlined_graph)
    for step in range(3):  # a mean offset, so that the centring matters
        x = (_input(4 + step) * 2 + 3).contiguous(memory_format=memory_format)
        torch.testing.assert_close(_train_step(ours, x), _train_step(reference, x), **TOL)
        _assert_grads_close(ours, reference, **TOL)
        _assert_states_close(ours, reference, **TOL)
    reference.eval()
    ours.eval()
    x = _input() * 2 + 3
    torch.testing.assert_close(ours(x), reference(x), **TOL)
    ours.save(tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    torch.testing.assert_close(loaded(x), reference(x), **TOL)


_SCRIPTED_VARIANTS = {
    "ghost batches, leaky_relu, cumulative average": (
        lambda: batchnorm.BatchNorm2d(3, activation="leaky_relu", ghost_batch_size=2,
                                      momentum=None), (4, 3, 5, 5)),
    "axis=-1, elu with alpha": (
        lambda: batchnorm.BatchNorm(3, axis=-1, activation="elu", activation_param=0.5),
        (4, 5, 3)),
    "no affine, no running statistics": (
        lambda: batchnorm.BatchNorm1d(3, affine=False, track_running_stats=False), (6, 3)),
    "frozen, relu6": (lambda: batchnorm.FrozenBatchNorm2d(3, activation="relu6"),
                      (4, 3, 5, 5)),
    "LayerNorm2d": (lambda: batchnorm.LayerNorm2d(3), (2, 3, 4, 4)),
    "InstanceNorm1d without a batch dim": (
        lambda: batchnorm.InstanceNorm1d(3, affine=True, track_running_stats=True), (3, 7)),
}


@pytest.mark.parametrize("name", list(_SCRIPTED_VARIANTS))
def test_jit_script_of_each_variant_matches_the_eager_layer(name):
    """What torch.nn has no layer for, against our eager layer: two training steps, then
    eval."""
    make, shape = _SCRIPTED_VARIANTS[name]
    torch.manual_seed(0)
    eager = make()
    with torch.no_grad():
        for tensor in (*eager.parameters(), *eager.buffers()):
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    scripted = torch.jit.script(copy.deepcopy(eager))
    for step in range(2):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 2 + 3
        inputs = [x.clone().requires_grad_() for _ in range(2)]
        torch.testing.assert_close(_train_step(scripted, inputs[0]),
                                   _train_step(eager, inputs[1]), **TOL)
        torch.testing.assert_close(inputs[0].grad, inputs[1].grad, **TOL)
        _assert_grads_close(scripted, eager, **TOL)
        _assert_states_close(scripted, eager, **TOL)
    scripted.eval()
    eager.eval()
    torch.testing.assert_close(scripted(x), eager(x), **TOL)


def test_jit_script_of_the_fused_residual_tail_matches_the_eager_layer():
    eager = batchnorm.BatchNorm2d(3, activation="relu")
    scripted = torch.jit.script(copy.deepcopy(eager))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=generator)
    shortcut = torch.randn(4, 3, 5, 5, generator=generator)
    shortcuts = [shortcut.clone().requires_grad_() for _ in range(2)]
    outputs = [model(x, shortcut) for model, shortcut in zip((scripted, eager), shortcuts,
                                                                strict=True)]
    torch.testing.assert_close(outputs[0], outputs[1], **TOL)
    for out in outputs:
        out.sum().backward()
    torch.testing.assert_close(shortcuts[0].grad, shortcuts[1].grad, **TOL)
    _assert_states_close(scripted, eager, **TOL)


@pytest.mark.parametrize("layer", [batchnorm.BatchNorm2d(3, renorm=True),
                                   batchnorm.SyncBatchNorm(3)], ids=["renorm", "syncbn"])
def test_jit_script_refuses_what_has_no_torchscript_form_naming_it(layer):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script: .* has no TorchScript form"):
        torch.jit.script(layer)


def test_scripted_batch_norm_rejects_a_nan_batch_and_a_single_value_per_channel():
    """The eager layer's messages, raised as TorchScript raises them (as for torch.nn's
    scripted layers): an operator's error as RuntimeError, the layer's own as
    torch.jit.Error."""
    scripted = torch.jit.script(batchnorm.BatchNorm2d(3))
    before = {name: value.clone() for name, value in scripted.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        scripted(x)
    with pytest.raises(torch.jit.Error, match="Expected more than 1 value per channel"):
        scripted(torch.randn(1, 3, 1, 1))
    for name, value in scripted.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_func_grad_through_functional_call_with_batch_norm_replaced():
    reference, ours = _pair()
    for model in (reference, ours):
        torch.func.replace_all_batch_norm_modules_(model)
    x = _input()

    def loss(model):
        def of(params):
            return torch.func.functional_call(model, params, (x,)).square().sum()
        return of

    grads = torch.func.grad(loss(ours))(dict(ours.named_parameters()))
    expected = torch.func.grad(loss(reference))(dict(reference.named_parameters()))
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, msg=name, rtol=1e-3, atol=1e-4)


def test_running_statistics_follow_a_batch_under_func_grad_as_in_eager():
    """torch.func.replace_all_batch_norm_modules_ changes only torch.nn's layers; ours keep
    their buffers, which follow the batch as one eager training step moves torch.nn's, and
    a non-finite batch raises and leaves them as they were."""
    reference, ours = _pair()
    x = _input()
    reference(x)
    torch.func.grad(lambda params: torch.func.functional_call(ours, params, (x,)).sum())(
        dict(ours.named_parameters()))
    _assert_states_close(ours, reference, **TOL)
    before = copy.deepcopy(ours.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input contains NaN or infinity"):
        torch.func.grad(lambda params: torch.func.functional_call(ours, params, (bad,)).sum())(
            dict(ours.named_parameters()))
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_vmap_in_training_refuses_to_move_the_running_statistics():
    _, ours = _pair()
    with pytest.raises(RuntimeError, match="running statistics cannot follow a batch under "
                                           "vmap"):
        torch.func.vmap(ours[:2])(_input(2).unsqueeze(1))


def test_vmap_per_sample_gradients_in_eval():
    reference, ours = _pair()
    for model in (reference, ours):
        model.eval()
    x = _input(3)

    def per_sample(model):
        params = {name: p.detach() for name, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(params, sample):
            out = torch.func.functional_call(model, (params, buffers), (sample.unsqueeze(0),))
            return out.square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    grads, expected = per_sample(ours), per_sample(reference)
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, msg=name, rtol=1e-3, atol=1e-4)


def test_jvp_matches_torch_nn():
    """Batch statistics without running buffers (torch.nn's layer cannot count batches
    under jvp either)."""
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    tangent = torch.randn_like(x)
    no_stats = {"track_running_stats": False, "dtype": torch.float64}
    for ours, reference in ((batchnorm.BatchNorm1d(4, **no_stats), nn.BatchNorm1d(4, **no_stats)),
                            (batchnorm.GroupNorm(2, 4).double(), nn.GroupNorm(2, 4).double()),
                            (batchnorm.LayerNorm(5).double(), nn.LayerNorm(5).double())):
        out, derivative = torch.func.jvp(ours, (x,), (tangent,))
        expected_out, expected_derivative = torch.func.jvp(reference, (x,), (tangent,))
        torch.testing.assert_close(out, expected_out)
        torch.testing.assert_close(derivative, expected_derivative)


def test_autocast_bfloat16_matches_torch_nn():
    reference, ours = _pair()
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_ref = ours(x), reference(x)
    assert y_ours.dtype == y_ref.dtype
    torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=0.05, atol=0.05)
    y_ours.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_profiler_shows_the_operator_names():
    _, ours = _pair()
    x = _input()
    with torch.profiler.profile() as profile:
        ours(x).sum().backward()
    names = {event.name for event in profile.events()}
    assert {"batchnorm::batch_norm", "batchnorm::batch_norm_backward",
            "batchnorm::group_norm", "batchnorm::layer_norm"} <= names


@pytest.mark.parametrize("options", [{"momentum": 0.1}, {"momentum": None},
                                     {"track_running_stats": False}],
                         ids=["momentum", "cumulative", "no-buffers"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_decomposition_of_each_statistics_policy_matches_torch_nn(options,
                                                                          training):
    """The decomposition's two forms (torch's own ATen operators; the var_mean form for a
    cumulative average) against torch.nn over three steps, buffers and gradients."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(4, **options).train(training)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
        reference.bias.uniform_(-1, 1)
    ours = batchnorm.convert(copy.deepcopy(reference))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(step)) * 3 + 10
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_ref = compiled(x_ours), reference(x_ref)
        torch.testing.assert_close(y_ours, y_ref, **TOL)
        y_ours.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-3, atol=1e-4)
    _assert_states_close(ours, reference, **TOL)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_compiled_decomposition_rejects_a_nan_batch_and_keeps_every_buffer(momentum):
    layer = batchnorm.BatchNorm1d(3, momentum=momentum)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(4, 3))
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinity"):
        compiled(x)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
