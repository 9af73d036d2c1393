"""Keras-exact batch normalization for PyTorch: ``tf_keras`` 2.21's BatchNormalization
layer and ``tf.nn``'s moments / batch_normalization, on torch tensors."""

from batchnorm.keras.layer import BatchNormalization
from batchnorm.keras.nn import batch_normalization, moments

__all__ = ["BatchNormalization", "batch_normalization", "moments"]
