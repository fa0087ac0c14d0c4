"""LARS (lars.py) against hand-computed steps, and the parameter grouping."""
import math

import torch
import torch.nn as nn

import lars


def ref_lars(w, grads, lrs, wd, eta, m, exclude):
    """Plain-Python LARS on a flat list of floats: u = g + wd w; u *= eta |w| / |u|; v = m v + u;
    w -= lr v."""
    w, v = list(w), [0.0] * len(w)
    for g, lr in zip(grads, lrs):
        if exclude:
            u = list(g)
        else:
            u = [gi + wd * wi for gi, wi in zip(g, w)]
            wn, un = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in u))
            trust = eta * wn / un if wn > 0 and un > 0 else 1.0
            u = [x * trust for x in u]
        v = [m * vi + ui for vi, ui in zip(v, u)]
        w = [wi - lr * vi for wi, vi in zip(w, v)]
    return w


def run_steps(param, grads, lrs, group_extra=None, **opt_kw):
    group = {"params": [param], **(group_extra or {})}
    opt = lars.LARS([group], **opt_kw)
    for g, lr in zip(grads, lrs):
        for grp in opt.param_groups:
            grp["lr"] = lr
        param.grad = g.clone()
        opt.step()
    return opt


def test_weight_matrix_first_step_by_hand():
    # W = diag(3, 4): |W| = 5. G + 0.1 W = diag(0.6, 0.8): |u| = 1. trust = 0.001 * 5 / 1 = 0.005.
    # v1 = diag(0.003, 0.004); W1 = W - 0.5 v1 = diag(2.9985, 3.998)
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    g = torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=torch.float64)
    opt = run_steps(w, [g], [0.5], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001)
    torch.testing.assert_close(w.detach(),
                               torch.tensor([[2.9985, 0.0], [0.0, 3.998]], dtype=torch.float64))
    torch.testing.assert_close(opt.state[w]["momentum_buffer"],
                               torch.tensor([[0.003, 0.0], [0.0, 0.004]], dtype=torch.float64))


def test_weight_matrix_two_steps_with_momentum():
    w0 = torch.tensor([[3.0, -1.0, 0.5], [2.0, 4.0, -2.0]], dtype=torch.float64)
    g1 = torch.tensor([[0.3, 0.1, -0.2], [0.0, 0.4, 0.7]], dtype=torch.float64)
    g2 = torch.tensor([[-0.5, 0.2, 0.1], [0.3, -0.1, 0.2]], dtype=torch.float64)
    lrs = [0.5, 0.3]  # the lr multiplies the whole momentum buffer
    w = nn.Parameter(w0.clone())
    run_steps(w, [g1, g2], lrs, lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.02)
    expected = ref_lars(w0.flatten().tolist(), [g1.flatten().tolist(), g2.flatten().tolist()], lrs,
                        wd=0.1, eta=0.02, m=0.9, exclude=False)
    torch.testing.assert_close(w.detach().flatten(), torch.tensor(expected, dtype=torch.float64))
    # sanity: momentum matters (a momentum-free result differs)
    no_mom = ref_lars(w0.flatten().tolist(), [g1.flatten().tolist(), g2.flatten().tolist()], lrs,
                      wd=0.1, eta=0.02, m=0.0, exclude=False)
    assert not torch.allclose(w.detach().flatten(), torch.tensor(no_mom, dtype=torch.float64))


def test_excluded_bias_by_hand_no_wd_no_trust_ratio():
    # v1 = g1 = (.5, .5); b1 = (1, -2) - .5 v1 = (.75, -2.25)
    # v2 = .9 v1 + g2 = (1.45, -.55); b2 = b1 - .5 v2 = (.025, -1.975)
    b = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    grads = [torch.tensor([0.5, 0.5], dtype=torch.float64),
             torch.tensor([1.0, -1.0], dtype=torch.float64)]
    run_steps(b, grads[:1], [0.5], group_extra={"lars_exclude": True},
              lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001)
    torch.testing.assert_close(b.detach(), torch.tensor([0.75, -2.25], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    run_steps(b, grads, [0.5, 0.5], group_extra={"lars_exclude": True},
              lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001)
    torch.testing.assert_close(b.detach(), torch.tensor([0.025, -1.975], dtype=torch.float64))


def test_param_groups_with_lars_handles_weights_and_bn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.Linear(3, 2))
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = lars.LARS(lars.param_groups(net), lr=0.2, weight_decay=0.05, momentum=0.9, eta=0.01)
    x = torch.randn(8, 4)
    all_grads = {n: [] for n in w0}
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        for n, p in net.named_parameters():
            all_grads[n].append(p.grad.flatten().tolist())
        opt.step()
    for n, p in net.named_parameters():
        exclude = p.ndim == 1
        expected = ref_lars(w0[n].flatten().tolist(), all_grads[n], [0.2, 0.2], wd=0.05, eta=0.01,
                            m=0.9, exclude=exclude)
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(expected),
                                   rtol=1e-5, atol=1e-6)


def test_larc_groups_trust_scale_and_decay_every_parameter():
    """kind "larc" (SwAV's LARC, CARL's default): one group; biases and BatchNorm take the trust
    ratio and weight decay like the weights, and several parameters step together (foreach)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    groups = lars.param_groups(net, "larc")
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(net.parameters()))
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = lars.LARS(groups, lr=0.3, weight_decay=0.05, momentum=0.9, eta=0.01)
    x = torch.randn(8, 4)
    all_grads = {n: [] for n in w0}
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        for n, p in net.named_parameters():
            all_grads[n].append(p.grad.flatten().tolist())
        opt.step()
    for n, p in net.named_parameters():
        expected = ref_lars(w0[n].flatten().tolist(), all_grads[n], [0.3, 0.3], wd=0.05, eta=0.01,
                            m=0.9, exclude=False)
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(expected),
                                   rtol=1e-5, atol=1e-6)
    # under "lars" the same biases would have taken plain SGD steps: the results differ
    assert len(lars.param_groups(net, "lars")) == 2


def test_zero_weight_uses_trust_one():
    # |w| = 0 -> trust ratio 1 (not 0): u = g + wd * 0 = g
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    run_steps(w, [g], [0.1], lr=0.1, weight_decay=0.1, momentum=0.9, eta=0.001)
    torch.testing.assert_close(w.detach(), -0.1 * g)


def test_skips_params_without_grad():
    w = nn.Parameter(torch.ones(2, 2))
    opt = lars.LARS([w], lr=0.1, weight_decay=0.1)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(2, 2))


def test_param_groups_splits_1d_params():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 5),
                        nn.LayerNorm(5), nn.Linear(5, 2, bias=False))
    frozen = nn.Linear(2, 2)
    for p in frozen.parameters():
        p.requires_grad_(False)
    net.append(frozen)
    decay, excl = lars.param_groups(net)
    assert not decay.get("lars_exclude", False)
    assert excl["lars_exclude"] is True and excl["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    want_decay = {id(net[0].weight), id(net[3].weight), id(net[5].weight)}
    want_excl = {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias),
                 id(net[4].weight), id(net[4].bias)}
    assert ids(decay["params"]) == want_decay
    assert ids(excl["params"]) == want_excl
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in excl["params"])


def test_param_groups_on_assignment_model_cover_every_param_once():
    import train

    m = train.build_model(train.parse_args(["--method", "carp", "--dataset", "cifar10"]))
    decay, excl = lars.param_groups(m)
    all_ids = [id(p) for p in m.parameters()]
    got = [id(p) for p in decay["params"]] + [id(p) for p in excl["params"]]
    assert sorted(got) == sorted(all_ids)
    bn_ids = {id(p) for mod in m.modules() if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d))
              for p in mod.parameters()}
    assert bn_ids and bn_ids <= {id(p) for p in excl["params"]}
    assert id(m.backbone.conv1.weight) in {id(p) for p in decay["params"]}
