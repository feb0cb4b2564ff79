"""Finding the CUDA GPU, with a one-line error where there is none."""

from nfsearch.errors import NfsearchError


def require_cuda(what: str) -> None:
    """Raise NfsearchError unless torch is installed and sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        raise NfsearchError(f"{what} needs a CUDA GPU and the gpu extra (pip install 'nfsearch[gpu]'); "
                            "torch is not installed") from None
    if not torch.cuda.is_available():
        raise NfsearchError(f"{what} needs a CUDA GPU; none is visible to torch "
                            f"(torch {torch.__version__}) — use --analytic for a roofline table")
