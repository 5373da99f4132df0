"""The selective scan's argument check, shared by every implementation."""
import torch


def check_inputs(u, delta, A, B, C, D):
    """Checks shapes, and that all six tensors share one floating dtype and device.

    Raises ValueError naming the offending argument.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"selective scan: {name} must be a tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, L, d), got shape {tuple(u.shape)}")
    if A.dim() != 2:
        raise ValueError(f"selective scan: A must be (d, N), got shape {tuple(A.shape)}")
    batch, length, d = u.shape
    n_state = A.shape[1]
    expected = {
        "delta": (batch, length, d),
        "A": (d, n_state),
        "B": (batch, length, n_state),
        "C": (batch, length, n_state),
        "D": (d,),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"selective scan: {name} has shape {tuple(named[name].shape)}, expected {shape} "
                f"for u of shape {tuple(u.shape)} and A of shape (d, N)"
            )
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1 or not u.is_floating_point():
        raise ValueError(f"selective scan: all inputs need one floating dtype, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"selective scan: all inputs need to be on one device, got {devices}")
