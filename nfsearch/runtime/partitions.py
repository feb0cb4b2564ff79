"""SM partitions for running kernels side by side on one GPU.

Two modes:

* ``mode="green"``: CUDA green contexts through ``cuda.bindings.driver``. Each partition is a
  group of SMs split off the device's SM resource; work launched on its stream runs only on those
  SMs. Partition sizes are rounded up to the device's granularity (8 SMs on Hopper).
* ``mode="grid"``: plain non-blocking torch streams. Nothing bounds the SMs except the kernels'
  own grid sizes (``num_sms`` argument of the SM-bounded kernels).

``stream(n)`` gives a cached stream for solo runs on ``n`` SMs (two streams of different sizes
from ``stream`` may share SMs). ``build(layout)`` gives streams on DISJOINT SM groups, one per
group of a ``nfsearch.layouts.Layout``, for co-runs; ``split(sizes)`` is the same for sizes that
are rounded to the granularity first (the last group takes the rest). ``layouts()`` lists every
layout this device can build (``nfsearch.layouts.buildable_layouts``).

How a layout is built (the rules are in ``nfsearch/layouts.py``)
----------------------------------------------------------------
``Layout.requests`` lists ((nbGroups, minCount), ...) per level. Level 0 splits the device's SM
resource with ``cuDevSmResourceSplitByCount``; each later level first makes a green context of the
previous remainder, asks it for its SM resource (``cuGreenCtxGetDevResource``) and splits that,
because the driver refuses to split a split's output directly (CUDA error 915). "equal-groups"
layouts are one call asking for k groups at once. Every group the driver hands back is checked
against the layout, and the SM count of each green context is read back from the driver
(``sm_count(stream)``); a layout the device cannot build raises PartitionError.

CUDA graphs across partitions
-----------------------------
``capture_graph(work)`` captures work issued on several partition streams into one
``torch.cuda.CUDAGraph``. The pattern: capture on one plain side stream; record a "fork" event on
it; every partition stream waits on that event (which pulls it into the same capture); issue each
stream's work; record a "join" event on each partition stream and make the capture stream wait on
all of them before the capture ends (a capture with an unjoined stream fails). Each kernel node
keeps the green context of the stream it was captured on, so replays run on the same partitions.
Kernels must be compiled (run once eagerly, ``issue_across``) before capture.

torch and cuda.bindings are imported on first use, so importing this module needs neither.
"""

from __future__ import annotations

from nfsearch.layouts import Layout, LayoutError, buildable_layouts, make_layout


class PartitionError(RuntimeError):
    """The GPU, driver or bindings cannot make the requested SM partitions."""


def check_driver(result):
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
    """SM partitions of one GPU, created lazily and cached per size/layout. Call ``close()`` when done."""

    def __init__(self, device: int = 0, mode: str = "green", max_groups: int = 3):
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
        self.max_groups = int(max_groups)
        props = torch.cuda.get_device_properties(self.device)
        self.num_sms = int(props.multi_processor_count)
        self.granularity = 1
        self._streams: dict[int, object] = {}
        self._splits: dict[tuple, list] = {}
        self._sms_of: dict[int, int] = {}     # raw stream handle -> SM count the driver reports
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
        check_driver(cu.cuInit(0))
        self._dev = check_driver(cu.cuDeviceGet(self.device))
        try:
            self._sm_res = check_driver(cu.cuDeviceGetDevResource(self._dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
            # Granularity: the size of the smallest group the driver hands out (8 on Hopper).
            groups, _n, _rem = check_driver(cu.cuDevSmResourceSplitByCount(1, self._sm_res, 0, 1))
            self.granularity = int(groups[0].sm.smCount)
        except PartitionError as exc:
            raise PartitionError(f"green contexts unsupported on this GPU/driver: {exc}") from exc
        self.num_sms = int(self._sm_res.sm.smCount)

    def _green_ctx(self, resource):
        cu = self._cu
        desc = check_driver(cu.cuDevResourceGenerateDesc([resource], 1))
        gctx = check_driver(cu.cuGreenCtxCreate(desc, self._dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        self._handles.append(("ctx", gctx))
        return gctx

    def _ctx_sm_resource(self, gctx):
        cu = self._cu
        return check_driver(cu.cuGreenCtxGetDevResource(gctx, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))

    def _green_stream(self, resource) -> tuple[int, object]:
        """(SM count the driver reports for the new green context, a torch stream on it)."""
        cu = self._cu
        gctx = self._green_ctx(resource)
        sms = int(self._ctx_sm_resource(gctx).sm.smCount)
        raw = check_driver(cu.cuGreenCtxStreamCreate(gctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        self._handles.append(("stream", raw))
        stream = self._torch.cuda.ExternalStream(int(raw), device=self.device)
        self._sms_of[int(stream.cuda_stream)] = sms
        return sms, stream

    def _plain_stream(self):
        return self._torch.cuda.Stream(device=self.device)

    def _build_green(self, layout: Layout) -> list:
        cu = self._cu
        res, out = self._sm_res, []
        levels = layout.requests
        for level, (nb, count) in enumerate(levels):
            try:
                groups, got, rem = check_driver(cu.cuDevSmResourceSplitByCount(nb, res, 0, count))
            except PartitionError as exc:
                raise PartitionError(f"layout {layout.sizes} ({layout.build}): split of level {level} into "
                                     f"{nb} x {count} SMs failed: {exc}") from exc
            sizes = [int(g.sm.smCount) for g in groups[:int(got)]]
            if int(got) != nb or any(s != count for s in sizes):
                raise PartitionError(f"layout {layout.sizes} ({layout.build}): asked the driver for {nb} x {count} "
                                     f"SMs at level {level}, got {sizes}")
            out.extend(self._green_stream(g) for g in groups[:nb])
            if level == len(levels) - 1:
                out.append(self._green_stream(rem))
            else:
                # a split's remainder cannot be split again; a green context's own resource can
                res = self._ctx_sm_resource(self._green_ctx(rem))
        got_sizes = tuple(s for s, _ in out)
        if got_sizes != layout.sizes:
            raise PartitionError(f"layout {layout.sizes} ({layout.build}): the driver's green contexts have "
                                 f"{got_sizes} SMs")
        return out

    # ------------------------------------------------------------------ public API
    def round(self, num_sms: int) -> int:
        """The SM count a partition of ``num_sms`` really gets."""
        n = max(1, int(num_sms))
        g = self.granularity
        return min(self.num_sms, -(-n // g) * g)

    def layouts(self) -> list[Layout]:
        """Every layout this device can build, with at most ``max_groups`` groups."""
        return buildable_layouts(self.num_sms, self.granularity, self.max_groups)

    def stream(self, num_sms: int):
        """A cached stream whose work runs on ``round(num_sms)`` SMs (green) or anywhere (grid)."""
        self._check_open()
        n = self.round(num_sms)
        if n not in self._streams:
            if self.mode == "grid" or n >= self.num_sms:
                self._streams[n] = self._plain_stream()
            else:
                cu = self._cu
                groups, _nb, _rem = check_driver(cu.cuDevSmResourceSplitByCount(1, self._sm_res, 0, n))
                self._streams[n] = self._green_stream(groups[0])[1]
        return self._streams[n]

    def build(self, layout) -> list:
        """Streams on the disjoint groups of a layout: ``[(sms, stream), ...]`` in layout order.

        ``layout`` is a Layout or a tuple of sizes; it must be buildable on this device (PartitionError
        says why not). The whole GPU is a plain stream. In grid mode the streams are plain and the SM
        counts are what the kernels should bound themselves to. Cached per layout.

        The groups of ONE build are disjoint (checked with %smid on an H100 for all 139 layouts
        tried); groups of different builds may share SMs even where their intervals on the SM line
        do not, so ops meant to co-run should take their streams from one build."""
        self._check_open()
        sizes = tuple(layout.sizes) if isinstance(layout, Layout) else tuple(int(s) for s in layout)
        try:
            lay = make_layout(sizes, self.num_sms, self.granularity, self.max_groups)
        except LayoutError as exc:
            raise PartitionError(f"{exc} on this GPU ({self.num_sms} SMs, granularity {self.granularity})") from exc
        if isinstance(layout, Layout):
            lay = layout          # buildable sizes; keep the build asked for (nested vs equal-groups)
        key = ("layout", lay.sizes, lay.build)
        if key not in self._splits:
            if lay.build == "whole":
                self._splits[key] = [(self.num_sms, self._plain_stream())]
            elif self.mode == "grid":
                self._splits[key] = [(n, self._plain_stream()) for n in lay.sizes]
            else:
                self._splits[key] = self._build_green(lay)
        return self._splits[key]

    def split(self, sizes) -> list:
        """Streams on disjoint SM groups: ``[(sms, stream), ...]`` one per requested size.

        Sizes are rounded up to the granularity; the last group takes all remaining SMs. Three-way
        splits are built as nested splits even where the fronts are equal: on an H100 the front 64
        SMs are SMs 0..63 from every one-group split, while groups asked together interleave
        their SMs (the front 64 of (64, 64, 4) is SMs 0,1,4,5,... against 0..63
        from split (64, 68)), so intervals built by different calls would overlap."""
        self._check_open()
        sizes = tuple(int(s) for s in sizes)
        if not sizes:
            raise ValueError("split needs at least one size")
        if len(sizes) == 1:
            return self.build((self.num_sms,))
        rounded = [self.round(s) for s in sizes[:-1]]
        if sum(rounded) >= self.num_sms:
            raise PartitionError(f"split {sizes} does not fit {self.num_sms} SMs at granularity {self.granularity}")
        sizes = (*rounded, self.num_sms - sum(rounded))
        if len(sizes) >= 3:
            try:
                make_layout(sizes, self.num_sms, self.granularity, self.max_groups)
            except LayoutError as exc:
                raise PartitionError(f"{exc} on this GPU ({self.num_sms} SMs, granularity {self.granularity})") from exc
            return self.build(Layout(sizes, "nested"))
        return self.build(sizes)

    def sm_count(self, stream) -> int:
        """SMs the driver reports for a green stream's context; the whole GPU for a plain stream."""
        return self._sms_of.get(int(stream.cuda_stream), self.num_sms)

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
        self._sms_of.clear()

    def _check_open(self):
        if self._closed:
            raise PartitionError("SmPartitions is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SmPartitions(device={self.device}, mode={self.mode!r}, num_sms={self.num_sms}, granularity={self.granularity})"


# ---------------------------------------------------------------------------------------------- across streams
def issue_across(work) -> None:
    """Run ``work`` = [(stream, fn), ...]: fork from the current stream, each fn on its stream, join
    back (the current stream waits for all). The same code runs eagerly and under capture."""
    import torch

    origin = torch.cuda.current_stream()
    fork = torch.cuda.Event()
    fork.record(origin)
    joins = []
    for stream, fn in work:
        stream.wait_event(fork)
        with torch.cuda.stream(stream):
            fn()
        done = torch.cuda.Event()
        done.record(stream)
        joins.append(done)
    for done in joins:
        origin.wait_event(done)


def capture_graph(work, pool=None):
    """One ``torch.cuda.CUDAGraph`` of ``work`` = [(stream, fn), ...] issued across partition streams
    (fork/join with events from a plain capture stream; see the module docstring). Replay with
    ``graph.replay()``; inputs and outputs are the tensors the fns read and write."""
    return capture_rounds([work], pool)


def capture_rounds(rounds, pool=None):
    """capture_graph of several rounds of work one after another: each round forks from the end of
    the previous one (all its streams joined) and is issued as ``issue_across`` issues one."""
    import torch

    graph = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=capture_stream, pool=pool):
        for work in rounds:
            issue_across(work)
    torch.cuda.current_stream().wait_stream(capture_stream)
    return graph


# ---------------------------------------------------------------------------------------------- observed SMs
_SMID_KERNEL = None


def _smid_kernel():
    global _SMID_KERNEL
    if _SMID_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def smid(out_ptr, spin_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            offs = tl.arange(0, BLOCK)
            acc = offs.to(tl.float32)
            # spin a few microseconds so that the blocks spread over every SM of the partition
            for _ in range(ITERS):
                acc = acc * 0.999 + 1.0
            ids = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [offs], dtype=tl.int32,
                                            is_pure=False, pack=1)
            tl.store(out_ptr + pid + offs, ids, mask=offs < 1)
            tl.store(spin_ptr + pid * BLOCK + offs, acc)

        _SMID_KERNEL = smid
    return _SMID_KERNEL


def launch_sm_probe(stream, num_blocks: int = 8192, iters: int = 2048):
    """Enqueue a kernel on ``stream`` whose every block writes the id of the SM it ran on (%smid);
    returns the int32 tensor of ids (read it after the stream is done). Capturable."""
    import torch

    kernel = _smid_kernel()
    with torch.cuda.stream(stream):
        ids = torch.full((num_blocks,), -1, dtype=torch.int32, device="cuda")
        spin = torch.empty((num_blocks * 32,), dtype=torch.float32, device="cuda")
        kernel[(num_blocks,)](ids, spin, ITERS=iters, BLOCK=32, num_warps=1)
    return ids


def observed_sm_ids(stream, num_blocks: int = 8192) -> frozenset[int]:
    """The SM ids a many-block kernel on ``stream`` ran on (all SMs its partition lets it use)."""
    import torch

    ids = launch_sm_probe(stream, num_blocks)
    stream.synchronize()
    got = ids.cpu()
    torch.cuda.synchronize()
    if (got < 0).any():
        raise PartitionError("the SM probe kernel left blocks unwritten")
    return frozenset(int(x) for x in got.tolist())
