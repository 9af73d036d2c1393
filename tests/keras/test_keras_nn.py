"""batchnorm.keras.moments / batch_normalization against tf.nn vectors from TF 2.21
(rtol 1e-5, atol 1e-5 * max|ref|), and against float64 math."""

from __future__ import annotations

import pytest
import torch

from batchnorm.keras import batch_normalization, moments


@pytest.mark.parametrize("label", ["nhwc", "rows", "all"])
def test_moments_match_tf_nn_moments(golden, close_to_tf, label):
    x = torch.from_numpy(golden["tfnn/x"])
    axes = [int(a) for a in golden[f"tfnn/moments_{label}_axes"]]
    keepdims = bool(golden[f"tfnn/moments_{label}_keepdims"])
    mean, variance = moments(x, axes, keepdims=keepdims)
    assert mean.shape == golden[f"tfnn/moments_{label}_mean"].shape
    close_to_tf(mean, golden[f"tfnn/moments_{label}_mean"], "mean")
    close_to_tf(variance, golden[f"tfnn/moments_{label}_variance"], "variance")


def test_moments_variance_is_biased_in_float64():
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, variance = moments(x, 0)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(variance, x.var(0, unbiased=False), rtol=1e-12, atol=0)


def test_batch_normalization_matches_tf_nn_output_and_all_gradients(golden, close_to_tf):
    x = torch.tensor(golden["tfnn/x"], requires_grad=True)
    args = {k: torch.tensor(golden[f"tfnn/bn_{k}"], requires_grad=True)
            for k in ("mean", "variance", "offset", "scale")}
    y = batch_normalization(x, args["mean"], args["variance"], args["offset"], args["scale"],
                            1e-3)
    (y * torch.from_numpy(golden["tfnn/bn_dy"])).sum().backward()
    close_to_tf(y, golden["tfnn/bn_y"], "output")
    close_to_tf(x.grad, golden["tfnn/bn_dx"], "dx")
    for key, tensor in args.items():
        close_to_tf(tensor.grad, golden[f"tfnn/bn_d{key}"], f"d{key}")


def test_batch_normalization_without_offset_and_scale_is_the_plain_normalization():
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean, var = x.mean(0), x.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(batch_normalization(x, mean, var, None, None, 1e-3), expected,
                               rtol=1e-12, atol=1e-12)


def test_batch_normalization_rejects_negative_epsilon():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"variance_epsilon must be non-negative, got -1"):
        batch_normalization(x, x.mean(0), x.var(0), None, None, -1.0)
