"""What the paged-KV GPU tests share: the error check, scattered page tables, and a CUDA-graph
capture that compiles and warms up outside the capture. Imported by test files in this folder (pytest
puts the folder on sys.path); nothing here runs without CUDA."""

from __future__ import annotations

import torch


def rel_error(out, ref, tol: float = 2e-2) -> float:
    """Relative L2 error of out against ref, asserted below tol; NaN means a row left unwritten."""
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "NaN in the output (a row left unwritten?)"
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()
    assert err < tol, f"relative error {err:.3e}"
    return err


def scattered_tables(lens, page_size: int, num_pages: int, max_pages: int) -> torch.Tensor:
    """Page tables [R, max_pages] int32 on the GPU: each request's pages drawn from a random
    permutation (no page shared), junk page ids past its pages."""
    perm = torch.randperm(num_pages).tolist()
    tables = torch.randint(0, num_pages, (len(lens), max_pages), dtype=torch.int32)
    for r, n in enumerate(lens):
        need = -(-n // page_size)
        tables[r, :need] = torch.tensor(perm[:need], dtype=torch.int32)
        perm = perm[need:]
    return tables.cuda()


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after one call on a side stream (Triton compiles there, not
    inside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
