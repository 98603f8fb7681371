"""``ef_sign``: scaled sign with worker and server error feedback (1-bit Adam / 1-bit LAMB's compressor)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import baseline
from .base import COMPRESSORS, _Compressed
from .bits import header_floats
from .settings import _check_int
from .sign_codec import ef_encode, sign_bytes, sign_decode
from .workspace import _empty


@COMPRESSORS.register("ef_sign")
class ErrorFeedbackSign(_Compressed):
    """Scaled sign with error feedback on workers and servers (1-bit Adam / 1-bit LAMB's
    compressor): a worker sends C(g + e_w), C(c) = mean|c| * sign(c) per bucket of
    ``bucket_size`` values, and keeps e_w = c - C(c). Two-sided, the server of a shard adds its
    error e_s to the average, sends C(avg + e_s) and keeps the residual. One-sided has no
    server step: every rank averages the decoded payloads exactly.

    Settings:
        bucket_size: values per fp32 scale, a positive multiple of 8.
        topology: ``one-sided`` (all_gather) or ``two-sided`` (parameter server shards).
        byzantine_ranks, byzantine_mode: corrupted ranks (experiments only).

    State: ``worker_error`` (the padded flat gradient), ``server_error`` (two-sided: the shard
    this rank serves).
    """

    name = "ef_sign"
    state_names = ("worker_error", "server_error")
    shard_state = ("server_error",)
    _bits = 1

    def __init__(self, bucket_size: int = 2048, topology: str = "one-sided", byzantine_ranks: Sequence[int] = (),
                 byzantine_mode: str = "flip", generator: Optional[torch.Generator] = None):
        super().__init__(topology, byzantine_ranks, byzantine_mode, generator)
        self.bucket_size = self.unit = _check_int("bucket_size", bucket_size, 8, multiple=8)

    def _header(self, size: int) -> int:
        return 4 * (size // self.bucket_size)

    def _payload(self, x, ws, tag):
        return None if ws is None else ws.get(tag, (x.shape[0], sign_bytes(x.shape[1], self.bucket_size)),
                                              torch.uint8, x.device)

    def _decode(self, data, size, ws, out=None, weight=1.0, accumulate=False, mean=False):
        if self.baseline:
            if mean:
                for r in range(data.shape[0]):
                    baseline.sign_decode(data[r:r + 1], size, self.bucket_size, out.view(1, size), ws, weight,
                                         accumulate or r > 0)
                return out
            return baseline.sign_decode(data, size, self.bucket_size, out, ws, weight, accumulate)
        return sign_decode(data, size, self.bucket_size, out, ws, weight, accumulate, mean)

    def _feedback(self, name: str, x: torch.Tensor, valid: int, ws, tag) -> torch.Tensor:
        """Send C(x + e) and keep e <- x + e - C(x + e); the first ``valid`` values are data,
        the padding after them keeps no error."""
        rows, size = x.shape
        err = self._buffer(name, x.numel(), x).view(rows, size)
        err.add_(x)
        if not self.baseline:
            data = ef_encode(err, self.bucket_size, valid, out=self._payload(x, ws, tag), ws=ws)
            err.view(-1)[valid:].zero_()
            return data
        nb = size // self.bucket_size
        data = baseline.sign_encode(err, self.bucket_size, out=self._payload(x, ws, tag), ws=ws, valid=valid)
        scales = header_floats(data, 4 * nb).view(rows, nb, 1)
        # C(c) is +-scale with the sign bit of c: exactly what decode returns for these bytes
        errb = err.view(rows, nb, self.bucket_size)
        sent = torch.copysign(scales, errb, out=_empty(ws, "ef.sent", errb.shape, torch.float32, x.device))
        errb.sub_(sent).view(-1)[valid:].zero_()
        return data

    def _worker(self, x, valid, ws, tag):
        return self._feedback("worker_error", x, valid, ws, tag)

    _reduce = _Compressed._mean

    def _serve(self, agg, valid, world):
        return self._feedback("server_error", agg, valid, self._ws, "served")

