"""An independent, slow re-statement of the official Vim, VideoMamba and AuM forward passes, for tests only.

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


def mamba_inner_shared(xz, p, dt_rank, d_state):
    """AuM's Fo-Bi ("bimamba v1") mixer without out_proj: one causal convolution and projection, scanned
    forward with A and on the flipped sequence with A_b (same D and delta bias), flipped back and summed."""
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    w = p["conv1d.weight"]
    x = F.silu(F.conv1d(x, w, p["conv1d.bias"], padding=w.shape[-1] - 1, groups=w.shape[0])[..., :length])
    x_dbl = torch.einsum("bdl,ed->ble", x, p["x_proj.weight"])
    delta = torch.einsum("blr,dr->bdl", x_dbl[..., :dt_rank], p["dt_proj.weight"])
    B = x_dbl[..., dt_rank:dt_rank + d_state].transpose(1, 2)
    C = x_dbl[..., dt_rank + d_state:].transpose(1, 2)
    out = scan_loop(x, delta, -torch.exp(p["A_log"]), B, C, p["D"], z, p["dt_proj.bias"])
    out_b = scan_loop(x.flip(-1), delta.flip(-1), -torch.exp(p["A_b_log"]), B.flip(-1), C.flip(-1), p["D"],
                      z.flip(-1), p["dt_proj.bias"])
    return out + out_b.flip(-1)


def official_blocks(sd, x, eps, mixer):
    """The residual blocks and the final add + norm of a state dict; mixer: "v2" (separate backward
    branch, summed), "v2_div2" (halved), "v1" (AuM's Fo-Bi) or "none" (one direction)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    hidden, residual = x, None
    for i in range(depth):
        p = {k[len(f"layers.{i}.mixer."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.mixer.")}
        residual = hidden if residual is None else residual + hidden
        h = rms_norm(residual, sd[f"layers.{i}.norm.weight"], eps)
        xz = torch.einsum("bld,ed->bel", h, p["in_proj.weight"])
        dt_rank = p["dt_proj.weight"].shape[1]
        d_state = p["A_log"].shape[1]
        if mixer == "v1":
            y = mamba_inner_shared(xz, p, dt_rank, d_state)
        elif mixer == "none":
            y = mamba_inner(xz, p, "", dt_rank, d_state)
        else:
            y = mamba_inner(xz, p, "", dt_rank, d_state) + mamba_inner(xz.flip(-1), p, "_b", dt_rank, d_state).flip(-1)
            if mixer == "v2_div2":
                y = y / 2
        hidden = torch.einsum("bdl,ed->ble", y, p["out_proj.weight"])
    return rms_norm(residual + hidden, sd["norm_f.weight"], eps)


def official_vim_logits(sd, images, stride, eps=1e-5, divide_out=True):
    """Logits of the official Vim (middle cls token, bimamba v2) for a state dict and images."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    pos = x.shape[1] // 2
    x = torch.cat((x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]), dim=1) + sd["pos_embed"]
    feat = official_blocks(sd, x, eps, "v2_div2" if divide_out else "v2")[:, pos]
    return feat @ sd["head.weight"].T + sd["head.bias"]


def official_videomamba_logits(sd, video, eps=1e-5):
    """Logits of the official VideoMamba (video_sm) for a state dict and clips (B, C, T, H, W): per-frame
    class token + spatial table, the class token of the first row kept, the temporal table added per
    frame, frame-major tokens after the class token, bimamba v2 summed, readout at token 0."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv3d(video, w, sd["patch_embed.proj.bias"], stride=tuple(w.shape[2:]))
    b, c, t, h, wd = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * wd, c)
    x = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), x), dim=1) + sd["pos_embed"]
    cls_tokens = x[:b, :1]
    x = x[:, 1:].reshape(b, t, h * wd, c).transpose(1, 2).reshape(b * h * wd, t, c)
    x = x + sd["temporal_pos_embedding"]
    x = x.reshape(b, h * wd, t, c).transpose(1, 2).reshape(b, t * h * wd, c)
    x = torch.cat((cls_tokens, x), dim=1)
    feat = official_blocks(sd, x, eps, "v2")[:, 0]
    return feat @ sd["head.weight"].T + sd["head.bias"]


def official_aum_logits(sd, spec, strides, variant, eps=1e-5):
    """Logits of the official AudioMamba for a state dict and log-mel input (B, T, F): viewed as
    (B, 1, F, T), patches frequency-major, class token inserted at N // 2, moved to the front for the
    position table (its entry first) and back; variant "Bi-Bi" / "Fo-Bi" / "Fo-Fo"."""
    x = spec.unsqueeze(1).transpose(2, 3)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=strides)
    x = x.flatten(2).transpose(1, 2)
    pos = x.shape[1] // 2
    x = torch.cat((x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]), dim=1)
    x = torch.cat((x[:, pos:pos + 1], x[:, :pos], x[:, pos + 1:]), dim=1) + sd["pos_embed.pos_embed"]
    x = torch.cat((x[:, 1:pos + 1], x[:, :1], x[:, pos + 1:]), dim=1)
    mixer = {"Bi-Bi": "v2_div2", "Fo-Bi": "v1", "Fo-Fo": "none"}[variant]
    feat = official_blocks(sd, x, eps, mixer)[:, pos]
    return feat @ sd["head.weight"].T + sd["head.bias"]
