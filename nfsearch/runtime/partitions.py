"""SM partitions for running kernels side by side on one GPU.

Two modes:

* ``mode="green"``: CUDA green contexts through ``cuda.bindings.driver``. Each partition is a
  group of SMs split off the device's SM resource; work launched on its stream runs only on those
  SMs. Partition sizes are rounded up to the device's granularity (8 SMs on Hopper).
* ``mode="grid"``: plain non-blocking torch streams. Nothing bounds the SMs except the kernels'
  own grid sizes (``num_sms`` argument of the SM-bounded kernels).

``stream(n)`` gives a cached stream for solo runs on ``n`` SMs (two streams of different sizes
from ``stream`` may share SMs). ``split(sizes)`` gives streams on DISJOINT SM groups, for co-runs.

torch and cuda.bindings are imported on first use, so importing this module needs neither.
"""

from __future__ import annotations


class PartitionError(RuntimeError):
    """The GPU, driver or bindings cannot make the requested SM partitions."""


def _check(result):
    """Unpack a cuda.bindings result tuple, raising PartitionError on a non-zero status."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise PartitionError(f"CUDA driver call failed: {err}")
    if len(rest) == 1:
        return rest[0]
    return rest


class SmPartitions:
    """SM partitions of one GPU, created lazily and cached per size. Call ``close()`` when done."""

    def __init__(self, device: int = 0, mode: str = "green"):
        if mode not in ("green", "grid"):
            raise ValueError(f"mode must be 'green' or 'grid', not {mode!r}")
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - CPU machines without torch
            raise PartitionError("SmPartitions needs torch with CUDA") from exc
        if not torch.cuda.is_available():
            raise PartitionError("SmPartitions needs a CUDA GPU (torch.cuda.is_available() is False)")
        self._torch = torch
        self.device = int(device)
        self.mode = mode
        props = torch.cuda.get_device_properties(self.device)
        self.num_sms = int(props.multi_processor_count)
        self.granularity = 1
        self._streams: dict[int, object] = {}
        self._splits: dict[tuple, list] = {}
        self._handles: list = []  # (kind, handle) to release in close()
        self._closed = False
        if mode == "green":
            self._init_green()

    # ------------------------------------------------------------------ green contexts
    def _init_green(self):
        try:
            from cuda.bindings import driver as cu
        except ImportError as exc:
            raise PartitionError("green contexts need the cuda.bindings package (cuda-python >= 12.4)") from exc
        if not hasattr(cu, "cuGreenCtxCreate"):
            raise PartitionError("these cuda.bindings have no green-context API (need CUDA >= 12.4)")
        self._cu = cu
        self._torch.cuda.init()
        _check(cu.cuInit(0))
        self._dev = _check(cu.cuDeviceGet(self.device))
        try:
            self._sm_res = _check(cu.cuDeviceGetDevResource(self._dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
            # Granularity: the size of the smallest group the driver hands out (8 on Hopper).
            groups, _n, _rem = _check(cu.cuDevSmResourceSplitByCount(1, self._sm_res, 0, 1))
            self.granularity = int(groups[0].sm.smCount)
        except PartitionError as exc:
            raise PartitionError(f"green contexts unsupported on this GPU/driver: {exc}") from exc
        self.num_sms = int(self._sm_res.sm.smCount)

    def _green_stream(self, resource):
        cu = self._cu
        desc = _check(cu.cuDevResourceGenerateDesc([resource], 1))
        gctx = _check(cu.cuGreenCtxCreate(desc, self._dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        self._handles.append(("ctx", gctx))
        raw = _check(cu.cuGreenCtxStreamCreate(gctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        self._handles.append(("stream", raw))
        return self._torch.cuda.ExternalStream(int(raw), device=self.device)

    def _plain_stream(self):
        return self._torch.cuda.Stream(device=self.device)

    # ------------------------------------------------------------------ public API
    def round(self, num_sms: int) -> int:
        """The SM count a partition of ``num_sms`` really gets."""
        n = max(1, int(num_sms))
        g = self.granularity
        return min(self.num_sms, -(-n // g) * g)

    def stream(self, num_sms: int):
        """A cached stream whose work runs on ``round(num_sms)`` SMs (green) or anywhere (grid)."""
        self._check_open()
        n = self.round(num_sms)
        if n not in self._streams:
            if self.mode == "grid" or n >= self.num_sms:
                self._streams[n] = self._plain_stream()
            else:
                cu = self._cu
                groups, _nb, _rem = _check(cu.cuDevSmResourceSplitByCount(1, self._sm_res, 0, n))
                self._streams[n] = self._green_stream(groups[0])
        return self._streams[n]

    def split(self, sizes) -> list:
        """Streams on disjoint SM groups: ``[(sms, stream), ...]`` one per requested size.

        Sizes are rounded up to the granularity; the last group takes all remaining SMs. In grid
        mode the streams are plain and the SM counts are what the kernels should bound themselves to.
        """
        self._check_open()
        sizes = tuple(int(s) for s in sizes)
        if not sizes:
            raise ValueError("split needs at least one size")
        if sizes in self._splits:
            return self._splits[sizes]
        rounded = [self.round(s) for s in sizes[:-1]]
        if sum(rounded) >= self.num_sms:
            raise PartitionError(f"split {sizes} does not fit {self.num_sms} SMs at granularity {self.granularity}")
        last = self.num_sms - sum(rounded)
        if self.mode == "grid":
            out = [(n, self._plain_stream()) for n in rounded] + [(last, self._plain_stream())]
        else:
            cu = self._cu
            out, res = [], self._sm_res
            for n in rounded:
                groups, _nb, rem = _check(cu.cuDevSmResourceSplitByCount(1, res, 0, n))
                out.append((int(groups[0].sm.smCount), self._green_stream(groups[0])))
                res = rem
            out.append((int(res.sm.smCount), self._green_stream(res)))
        self._splits[sizes] = out
        return out

    def close(self):
        """Release all green contexts and streams. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        if self.mode == "green":
            cu = self._cu
            for kind, h in reversed(self._handles):
                if kind == "stream":
                    cu.cuStreamDestroy(h)
                else:
                    cu.cuGreenCtxDestroy(h)
        self._handles.clear()
        self._streams.clear()
        self._splits.clear()

    def _check_open(self):
        if self._closed:
            raise PartitionError("SmPartitions is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SmPartitions(device={self.device}, mode={self.mode!r}, num_sms={self.num_sms}, granularity={self.granularity})"
