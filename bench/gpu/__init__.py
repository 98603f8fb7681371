"""The GPU check's sections, one module each (``bench/gpu_check.py`` runs them): ``tuned``,
``throughput`` (with ``conadv``), ``guard``, ``sweep``, ``codecs`` (``codec``, ``powersgd``),
``nccl``, ``lamb``, ``trace``; ``harness`` holds what they share."""
