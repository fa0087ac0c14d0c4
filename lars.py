"""LARS (You et al. 2017), as used by BYOL, Barlow Twins and (as LARC) SwAV, plus the parameter
grouping.

For each parameter w with gradient g (weight decay wd, trust coefficient eta, momentum m):
    u = g + wd * w
    u = u * eta * ||w|| / ||u||      (only when both norms are > 0)
    v = m * v + u ;  w = w - lr * v
A group with `lars_exclude=True` skips both weight decay and the trust ratio (plain SGD with
momentum). `param_groups` builds the two conventions:
  - "lars" (BYOL, Barlow Twins, the thesis's CARP): biases and BatchNorm parameters (every 1-d
    tensor) excluded;
  - "larc" (SwAV's LARC, whose recipe the thesis's CARL uses): every parameter decayed and
    trust-scaled. SwAV's LARC divides by ||g|| + wd * ||w|| rather than ||g + wd * w||; the two
    agree up to the angle between g and w.
The step uses torch._foreach_* ops (multi-tensor kernels on CUDA) for the norms, weight decay and
momentum; only the trust-ratio multiply stays one small op per parameter. On a 2-core CPU this is
no faster than a plain loop (RESULTS.md); on a GPU it cuts most of the per-parameter kernel
launches.
"""
import torch


def param_groups(model, kind="lars", excluded_lr_scale=1.0):
    """Parameter groups for LARS/SGD. kind "lars": weights (decayed, trust-scaled) and 1-d
    biases/BatchNorm (neither, lr times excluded_lr_scale); kind "larc": one group for all.
    Each group carries `lr_scale`, the factor a schedule multiplies its lr by."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "larc":
        return [{"params": params, "lr_scale": 1.0}]
    return [{"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
             "lars_exclude": True, "lr_scale": excluded_lr_scale}]


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            if not params:
                continue
            updates = [w.grad for w in params]
            if not group["lars_exclude"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                w_norms = torch.stack(torch._foreach_norm(params))  # (n,)
                u_norms = torch.stack(torch._foreach_norm(updates))  # (n,)
                trust = torch.where((w_norms > 0) & (u_norms > 0),
                                    group["eta"] * w_norms / u_norms, 1.0)  # (n,)
                updates = torch._foreach_mul(updates, list(trust.unbind()))
            for w in params:
                if "momentum_buffer" not in self.state[w]:
                    self.state[w]["momentum_buffer"] = torch.zeros_like(w)
            buffers = [self.state[w]["momentum_buffer"] for w in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            lr = group["lr"]  # a float, or a device tensor in a compiled step (train.py)
            if isinstance(lr, torch.Tensor):  # (alpha= would read it on the host: a sync)
                torch._foreach_add_(params, torch._foreach_mul(buffers, -lr))
            else:
                torch._foreach_add_(params, buffers, alpha=-lr)
