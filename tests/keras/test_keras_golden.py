"""batchnorm.keras.BatchNormalization against vectors recorded from real tf_keras 2.21.

Each case replays the recorded run: ``steps`` training calls (outputs, gradients of
``sum(y * dy)`` w.r.t. input, gamma and beta, every layer variable after the call, then SGD
on gamma/beta with the recorded learning rate), then one inference call.
Tolerance: rtol 1e-5, atol 1e-5 * max|ref| (see conftest).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.keras import BatchNormalization

with np.load(Path(__file__).with_name("golden.npz")) as _data:
    CASES = sorted(key.split("/")[0] for key in _data.files if key.endswith("/meta"))


def _meta(golden: dict[str, np.ndarray], case: str) -> dict:
    return json.loads(str(golden[f"{case}/meta"]))


def _layer_like_tf(golden: dict[str, np.ndarray], case: str) -> BatchNormalization:
    """The case's tf_keras arguments, with its recorded initial weights as initializers."""
    meta = _meta(golden, case)
    kwargs = dict(meta["kwargs"])
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        initial = golden[f"{case}/init_{name}"]
        kwargs[f"{name}_initializer"] = lambda shape, dtype, initial=initial: initial
    if meta["adjustment"]:
        adj_scale = torch.from_numpy(golden[f"{case}/adjustment_scale"])
        adj_bias = torch.from_numpy(golden[f"{case}/adjustment_bias"])
        kwargs["adjustment"] = lambda shape: (adj_scale, adj_bias)
    return BatchNormalization(**kwargs)


def test_golden_file_has_every_feature_of_the_issue(golden):
    features = {json.dumps(_meta(golden, case)["kwargs"], sort_keys=True) for case in CASES}
    text = " ".join(features)
    for needle in ('"renorm": true', "renorm_clipping", "virtual_batch_size", '"axis": 1',
                   '"center": false', '"trainable": false', '"epsilon": 1e-07'):
        assert needle in text, needle
    ranks = {len(_meta(golden, case)["shape"]) for case in CASES}
    assert ranks == {2, 3, 4, 5}
    assert any(_meta(golden, case)["adjustment"] for case in CASES)


@pytest.mark.parametrize("case", CASES)
def test_layer_matches_tf_keras_outputs_gradients_and_moving_statistics(golden, case,
                                                                         close_to_tf):
    meta = _meta(golden, case)
    layer = _layer_like_tf(golden, case)
    for step in range(meta["steps"] + 1):
        training = step < meta["steps"]
        x = torch.tensor(golden[f"{case}/x{step}"], requires_grad=True)
        y = layer(x, training=training)
        (y * torch.from_numpy(golden[f"{case}/dy{step}"])).sum().backward()
        where = f"{case} step {step} ({'training' if training else 'inference'})"
        close_to_tf(y.detach(), golden[f"{case}/y{step}"], f"{where}: output")
        close_to_tf(x.grad, golden[f"{case}/dx{step}"], f"{where}: input gradient")
        for name in ("gamma", "beta"):
            param = getattr(layer, name)
            if param is not None and param.requires_grad:
                close_to_tf(param.grad, golden[f"{case}/d{name}{step}"], f"{where}: d{name}")
        for name in layer.weight_names:
            close_to_tf(getattr(layer, name), golden[f"{case}/{name}{step}"],
                        f"{where}: {name}")
        with torch.no_grad():
            for param in (layer.gamma, layer.beta):
                if param is not None and param.requires_grad:
                    param -= meta["lr"] * param.grad
                    param.grad = None


@pytest.mark.parametrize("case", CASES)
def test_layer_takes_the_fused_path_and_weight_order_of_tf_keras(golden, case):
    meta = _meta(golden, case)
    layer = _layer_like_tf(golden, case)
    layer(torch.from_numpy(golden[f"{case}/x0"]), training=False)
    assert layer.fused == meta["fused"]
    assert layer.weight_names == meta["weights"]


def test_fused_path_keeps_epsilon_below_1e_5_like_tf_2_21_on_cpu(golden, close_to_tf):
    """tiny_eps_fused runs TF's fused kernel with epsilon=1e-7: with epsilon raised to
    1.001e-5 the recorded outputs would differ by ~1e-5 relative, beyond the tolerance."""
    case = "tiny_eps_fused"
    assert _meta(golden, case)["fused"] and _meta(golden, case)["kwargs"]["epsilon"] == 1e-7
    x = torch.from_numpy(golden[f"{case}/x0"])
    raised = _layer_like_tf(golden, case)
    raised.epsilon = 1.001e-5
    with pytest.raises(AssertionError):
        close_to_tf(raised(x, training=True).detach(), golden[f"{case}/y0"], "raised eps")
    close_to_tf(_layer_like_tf(golden, case)(x, training=True).detach(),
                golden[f"{case}/y0"], "eps as given")


def test_fused_and_unfused_store_unbiased_and_biased_moving_variance(golden):
    """Same input through TF's fused (NHWC) and non-fused layers: the stored variances
    differ exactly by Bessel's factor n / (n - 1) after one step from the same start."""
    x = torch.from_numpy(golden["nhwc_fused/x0"]).double()
    n = x.numel() // x.shape[-1]
    batch_var = x.var(dim=(0, 1, 2), unbiased=False)
    stored = {}
    for fused in (None, False):
        layer = BatchNormalization(fused=fused, momentum=0.0)
        layer(x.float(), training=True)
        stored[layer.fused] = layer.moving_variance.double()
    torch.testing.assert_close(stored[False], batch_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(stored[True], batch_var * n / (n - 1), rtol=1e-5, atol=0)
