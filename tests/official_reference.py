"""An independent, slow re-statement of the official Vim forward pass, for tests only.

It follows the official code's structure rather than ours: channel-major (batch, d, L) tensors,
torch's Conv1d with padding then truncation, the backward branch computed on the flipped sequence
and flipped back, the scan as a plain loop with the softplus and bias applied inside it, and the
gate applied per branch. It reads a raw state dict, so it shares no code with the library.
"""
import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def scan_loop(u, delta, A, B, C, D, z, delta_bias):
    """u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L); out (b, d, L) = (y + D u) * silu(z)."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) + D[None, :, None] * u
    return y * F.silu(z)


def mamba_inner(xz, p, suffix, dt_rank, d_state):
    """One direction of the v2 mixer without out_proj; xz: (b, 2d, L) -> (b, d, L)."""
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    w = p["conv1d" + suffix + ".weight"]
    x = F.silu(F.conv1d(x, w, p["conv1d" + suffix + ".bias"], padding=w.shape[-1] - 1, groups=w.shape[0])[..., :length])
    x_dbl = torch.einsum("bdl,ed->ble", x, p["x_proj" + suffix + ".weight"])
    delta = torch.einsum("blr,dr->bdl", x_dbl[..., :dt_rank], p["dt_proj" + suffix + ".weight"])
    B = x_dbl[..., dt_rank:dt_rank + d_state].transpose(1, 2)
    C = x_dbl[..., dt_rank + d_state:].transpose(1, 2)
    A = -torch.exp(p["A_log" if not suffix else "A_b_log"])
    return scan_loop(x, delta, A, B, C, p["D" + suffix], z, p["dt_proj" + suffix + ".bias"])


def official_vim_logits(sd, images, stride, eps=1e-5, divide_out=True):
    """Logits of the official Vim (middle cls token, bimamba v2) for a state dict and images."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    pos = x.shape[1] // 2
    x = torch.cat((x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]), dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    hidden, residual = x, None
    for i in range(depth):
        p = {k[len(f"layers.{i}.mixer."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.mixer.")}
        residual = hidden if residual is None else residual + hidden
        h = rms_norm(residual, sd[f"layers.{i}.norm.weight"], eps)
        xz = torch.einsum("bld,ed->bel", h, p["in_proj.weight"])
        dt_rank = p["dt_proj.weight"].shape[1]
        d_state = p["A_log"].shape[1]
        out = mamba_inner(xz, p, "", dt_rank, d_state)
        out_b = mamba_inner(xz.flip(-1), p, "_b", dt_rank, d_state)
        y = out + out_b.flip(-1)
        if divide_out:
            y = y / 2
        hidden = torch.einsum("bdl,ed->ble", y, p["out_proj.weight"])
    feat = rms_norm(residual + hidden, sd["norm_f.weight"], eps)[:, pos]
    return feat @ sd["head.weight"].T + sd["head.bias"]
