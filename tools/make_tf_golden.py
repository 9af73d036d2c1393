"""Write ``tests/keras/golden.npz``: golden vectors from real tf_keras BatchNormalization.

Not part of the normal test set-up; run it in a separate environment with TensorFlow:

    python3 -m venv tfenv
    tfenv/bin/pip install tensorflow==2.21.0 tf-keras==2.21.0
    tfenv/bin/python tools/make_tf_golden.py            # writes tests/keras/golden.npz

Each case builds a ``tf_keras.layers.BatchNormalization`` from its keyword arguments with
seeded initial weights, runs ``STEPS`` training steps (``training=True``; upstream gradient
``dy``, then plain SGD on gamma/beta with ``LR``), recording outputs, the gradients of
``sum(y * dy)`` with respect to input, gamma and beta, and every layer variable after each
step, then one inference call (``training=False``). The case's arguments are stored as
JSON next to its arrays, so the tests rebuild exactly the same layer.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf
import tf_keras

STEPS = 3
LR = 0.1
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "keras", "golden.npz")

# name -> (input shape, layer kwargs[, input scale]); "adjustment": True gets a fixed
# per-channel (scale, bias) pair, recorded in the file
CASES = {
    "dense": ((10, 5), {}),
    "dense_momentum": ((10, 5), {"momentum": 0.9, "epsilon": 1e-2}),
    "nhwc_fused": ((4, 3, 5, 6), {}),
    "nhwc_unfused": ((4, 3, 5, 6), {"fused": False}),
    "nchw_fused": ((4, 6, 3, 5), {"axis": 1, "momentum": 0.9}),
    "seq3d": ((4, 7, 5), {}),
    "seq3d_axis1": ((4, 7, 5), {"axis": 1}),
    "vol5d_fused": ((2, 3, 4, 5, 6), {}),
    "vol5d_axis2": ((2, 3, 4, 5, 6), {"axis": 2}),
    "renorm": ((12, 5), {"renorm": True, "momentum": 0.9, "renorm_momentum": 0.8}),
    "renorm_clipped_nhwc": ((6, 3, 4, 5), {"renorm": True, "momentum": 0.9,
                                           "renorm_momentum": 0.7, "renorm_clipping":
                                           {"rmin": 0.9, "rmax": 1.1, "dmax": 0.05}}),
    # sqrt(epsilon) = 2 exceeds the initial renorm_stddev: r and d use the floor
    "renorm_large_eps": ((12, 5), {"renorm": True, "epsilon": 4.0, "renorm_momentum": 0.5}),
    "virtual_2d": ((12, 5), {"virtual_batch_size": 3, "momentum": 0.9}),
    "virtual_nhwc": ((8, 3, 4, 5), {"virtual_batch_size": 4}),
    "virtual_nchw": ((8, 5, 3, 4), {"axis": 1, "virtual_batch_size": 2}),
    "renorm_virtual": ((12, 5), {"renorm": True, "virtual_batch_size": 4, "momentum": 0.9,
                                 "renorm_momentum": 0.8,
                                 "renorm_clipping": {"rmax": 1.2, "dmax": 0.1}}),
    "adjustment_nhwc": ((6, 3, 4, 5), {"adjustment": True}),
    "adjustment_renorm": ((12, 5), {"adjustment": True, "renorm": True,
                                    "renorm_momentum": 0.8}),
    "no_center_no_scale": ((10, 5), {"center": False, "scale": False}),
    "no_scale_fused": ((4, 3, 5, 6), {"scale": False}),
    "not_trainable": ((4, 3, 5, 6), {"trainable": False}),
    # variance ~1e-4, so epsilon 1e-7 vs 1.001e-5 changes the output by ~5%
    "tiny_eps_fused": ((4, 6, 3, 5), {"axis": 1, "epsilon": 1e-7}, 0.01),
    "tiny_eps_unfused": ((10, 5), {"epsilon": 1e-7}, 0.01),
}


def channels_of(shape, kwargs):
    return shape[kwargs.get("axis", -1)]


def case_arrays(name, shape, kwargs, rng, input_scale=1.0):
    channels = channels_of(shape, kwargs)
    arrays = {}
    init = {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(0.0, 0.5, channels),
        "moving_mean": rng.normal(0.0, 1.0, channels),
        "moving_variance": rng.uniform(0.5, 2.0, channels),
    }
    init = {k: v.astype(np.float32) for k, v in init.items()}
    for key, value in init.items():
        arrays[f"init_{key}"] = value
    layer_kwargs = dict(kwargs)
    layer_kwargs.update(
        gamma_initializer=tf_keras.initializers.Constant(init["gamma"]),
        beta_initializer=tf_keras.initializers.Constant(init["beta"]),
        moving_mean_initializer=tf_keras.initializers.Constant(init["moving_mean"]),
        moving_variance_initializer=tf_keras.initializers.Constant(init["moving_variance"]))
    if kwargs.get("adjustment"):
        adj_scale = rng.uniform(0.8, 1.2, channels).astype(np.float32)
        adj_bias = rng.normal(0.0, 0.2, channels).astype(np.float32)
        arrays["adjustment_scale"], arrays["adjustment_bias"] = adj_scale, adj_bias
        layer_kwargs["adjustment"] = lambda _shape: (tf.constant(adj_scale),
                                                     tf.constant(adj_bias))
    layer = tf_keras.layers.BatchNormalization(**layer_kwargs)
    # per-channel offsets and scales so the statistics are far from (0, 1)
    axis = kwargs.get("axis", -1)
    bshape = [1] * len(shape)
    bshape[axis] = channels
    offset = rng.normal(0.0, 2.0, channels).reshape(bshape) * input_scale
    spread = rng.uniform(0.5, 3.0, channels).reshape(bshape) * input_scale

    def draw():
        return (rng.normal(size=shape) * spread + offset).astype(np.float32)

    for step in range(STEPS + 1):
        training = step < STEPS
        x = tf.Variable(draw())
        dy = rng.normal(size=shape).astype(np.float32)
        with tf.GradientTape() as tape:
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * dy)
        params = [p for p in (layer.gamma, layer.beta) if p is not None]
        grads = tape.gradient(loss, [x, *params])
        arrays[f"x{step}"], arrays[f"dy{step}"], arrays[f"y{step}"] = x.numpy(), dy, y.numpy()
        arrays[f"dx{step}"] = grads[0].numpy()
        for param, grad in zip(params, grads[1:], strict=True):
            pname = param.name.split("/")[-1].split(":")[0]
            arrays[f"d{pname}{step}"] = grad.numpy().reshape(-1)
        for weight in layer.weights:
            wname = weight.name.split("/")[-1].split(":")[0]
            arrays[f"{wname}{step}"] = weight.numpy().reshape(-1)
        if training:
            for param, grad in zip(params, grads[1:], strict=True):
                if param.trainable and layer.trainable:
                    param.assign_sub(LR * grad)
    config = {k: v for k, v in kwargs.items() if k != "adjustment"}
    meta = {"shape": list(shape), "kwargs": config, "fused": bool(layer.fused),
            "adjustment": bool(kwargs.get("adjustment")), "steps": STEPS, "lr": LR,
            "weights": [w.name.split("/")[-1].split(":")[0] for w in layer.weights]}
    arrays["meta"] = np.array(json.dumps(meta))
    return {f"{name}/{k}": v for k, v in arrays.items()}


def tf_nn_arrays(rng):
    x = rng.normal(1.0, 2.0, (4, 3, 5, 6)).astype(np.float32)
    arrays = {"tfnn/x": x}
    for label, axes, keepdims in (("nhwc", [0, 1, 2], False), ("rows", [1], True),
                                  ("all", [0, 1, 2, 3], False)):
        mean, var = tf.nn.moments(tf.constant(x), axes, keepdims=keepdims)
        arrays[f"tfnn/moments_{label}_mean"] = mean.numpy()
        arrays[f"tfnn/moments_{label}_variance"] = var.numpy()
        arrays[f"tfnn/moments_{label}_axes"] = np.array(axes)
        arrays[f"tfnn/moments_{label}_keepdims"] = np.array(keepdims)
    args = {"mean": rng.normal(size=6), "variance": rng.uniform(0.5, 2.0, 6),
            "offset": rng.normal(size=6), "scale": rng.uniform(0.5, 1.5, 6)}
    args = {k: tf.Variable(v.astype(np.float32)) for k, v in args.items()}
    xv = tf.Variable(x)
    dy = rng.normal(size=x.shape).astype(np.float32)
    with tf.GradientTape() as tape:
        y = tf.nn.batch_normalization(xv, args["mean"], args["variance"], args["offset"],
                                      args["scale"], 1e-3)
        loss = tf.reduce_sum(y * dy)
    grads = tape.gradient(loss, [xv, *args.values()])
    arrays["tfnn/bn_dy"], arrays["tfnn/bn_y"] = dy, y.numpy()
    for key, grad in zip(["x", *args], grads, strict=True):
        arrays[f"tfnn/bn_d{key}"] = grad.numpy()
    for key, value in args.items():
        arrays[f"tfnn/bn_{key}"] = value.numpy()
    return arrays


def main() -> int:
    rng = np.random.default_rng(20260)
    arrays = {"versions": np.array(json.dumps({"tensorflow": tf.__version__,
                                               "tf_keras": tf_keras.__version__}))}
    for name, (shape, kwargs, *input_scale) in CASES.items():
        arrays.update(case_arrays(name, shape, kwargs, rng, *input_scale))
    arrays.update(tf_nn_arrays(rng))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays for {len(CASES)} cases to {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
