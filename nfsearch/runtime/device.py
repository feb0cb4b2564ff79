"""Finding the CUDA GPU, with a one-line error where there is none."""

from nfsearch.errors import NfsearchError
from nfsearch.plan import NO_SHARE_IMPLS


def require_cuda(what: str, hint: str = "") -> None:
    """Raise NfsearchError unless torch is installed and sees a CUDA GPU; `hint`: what the user can do
    instead, appended to the message."""
    try:
        import torch
    except ImportError:
        raise NfsearchError(f"{what} needs a CUDA GPU and the gpu extra (pip install 'nfsearch[gpu]'); "
                            "torch is not installed") from None
    if not torch.cuda.is_available():
        raise NfsearchError(f"{what} needs a CUDA GPU; none is visible to torch (torch {torch.__version__})"
                            + (f" — {hint}" if hint else ""))


# e4m3 tensor-core GEMMs (torch._scaled_mm) and Triton's fp8e4nv conversions need compute capability 8.9+
MIN_FP8_CAPABILITY = (8, 9)


def fp8_refusal(name: str, capability: tuple[int, int]) -> str | None:
    """Why a GPU cannot run the FP8 GEMMs and KV cache (None where it can)."""
    if tuple(capability) >= MIN_FP8_CAPABILITY:
        return None
    return (f"this {name} is compute capability {capability[0]}.{capability[1]}; FP8 needs "
            f"{MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)")


def fp8_support(device) -> str | None:
    """fp8_refusal of a torch device; None on the CPU, where the FP8 path is emulated in float32."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return fp8_refusal(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def check_device(schedule, where: str, force: bool) -> None:
    """One-line errors for plans this GPU cannot run (another GPU; SM counts it cannot partition)."""
    import torch
    props = torch.cuda.get_device_properties(0)
    sms, name = int(props.multi_processor_count), props.name
    too_big = [op.id for op in schedule.nano_ops if op.sm_count > sms]
    if too_big:
        raise NfsearchError(f"{where}: nano-op {too_big[0]} asks for more SMs than this {name} has ({sms})")
    # 0 SMs: a collective whose impl holds no SM share (plan.check_structure already refuses any other)
    no_sms = [op.id for op in schedule.nano_ops if op.sm_count < 1 and op.impl not in NO_SHARE_IMPLS]
    if no_sms:
        raise NfsearchError(f"{where}: nano-op {no_sms[0]} asks for no SMs and its impl holds a share")
    if (schedule.gpu.num_sms != sms or schedule.gpu.name != name) and not force:
        raise NfsearchError(f"{where}: plan is for {schedule.gpu.name} ({schedule.gpu.num_sms} SMs), "
                            f"this GPU is {name} ({sms} SMs) (--force to run anyway)")
