"""dat-ds: distributed adversarial training on DeepSpeed.

Submodules: ``attacks`` (inner maximization), ``models`` (timm backbones with normalization
inside), ``data`` (sharded datasets), ``optim`` (LAMB with layerwise adaptive LR, schedules),
``compress`` (gradient communication), ``engine`` (DeepSpeed glue, checkpoints), ``trainer``
(the DAT loop), ``evaluate`` (TA / RA).
"""
__version__ = "0.1.0"
