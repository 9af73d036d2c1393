"""Tools around BatchNorm: fold it into conv/linear layers for inference, recalibrate its
running statistics exactly, and diagnose the usual mistakes. Each works on plain
torch.nn models as well as on ours."""

from batchnorm.tools.doctor import Finding, doctor
from batchnorm.tools.fold import fold
from batchnorm.tools.recalibrate import recalibrate

__all__ = ["Finding", "doctor", "fold", "recalibrate"]
