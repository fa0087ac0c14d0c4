"""LARS (You et al. 2017), as used by BYOL and Barlow Twins, plus the parameter grouping.

For each parameter w with gradient g (weight decay wd, trust coefficient eta, momentum m):
    u = g + wd * w
    u = u * eta * ||w|| / ||u||      (only when both norms are > 0)
    v = m * v + u ;  w = w - lr * v
Biases and BatchNorm parameters (every 1-d tensor) get neither weight decay nor the trust
ratio: put them in a group with `lars_exclude=True` (see `param_groups`).
"""
import torch


def param_groups(model, excluded_lr_scale=1.0):
    """Two groups: weights (decayed, LARS-adapted) and 1-d biases/BatchNorm (neither). Each
    carries `lr_scale`, the factor a schedule multiplies its lr by (excluded_lr_scale for the 1-d group)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "lr_scale": excluded_lr_scale}]


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                u = w.grad
                if not group["lars_exclude"]:
                    u = u.add(w, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(w), torch.norm(u)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                    u = u.mul(trust)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(u)
                w.add_(v, alpha=-group["lr"])
