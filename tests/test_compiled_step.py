"""The compiled step (train.py --compile) against the eager one, on the CPU: for every method and
the published CARP recipe, 3 steps give the same losses, weights, BatchNorm buffers, momentum
buffers, EMA teacher and queue. The per-step values (lr, lambda, momentum, the step and so CARP's
partition) are inputs of the graphs, not constants: no graph is made after the first step but
SwAV's at its two known changes. The only graph breaks are at backward and inside torch's own
optimizers, so nothing in the step reads a tensor on the host (.item(), a branch on a value, a
data-dependent shape would break the graph).

Run size: batch 8 of 8 px views, 2 steps per epoch: step 2 is SwAV's first with learning prototypes
and a full queue (32 rows, 16 a step) and follows MoCo's queue wrapping round.

The whole-step tests compile with the "aot_eager" backend: torch.compile's capture runs whole
(Dynamo: guards, graph breaks, side effects on the optimizer, BatchNorm and the model; AOTAutograd:
the functional forward and backward graphs), its graphs then run by eager kernels rather than
inductor's generated C++, which takes ~50 s a method on a 2-core CPU. Inductor itself is checked on
the step's own arithmetic: the partition's integer hashing and LARS with a device lr."""
import pytest
import torch

import lars
import losses
import train
from conftest import needs_cxx
from test_methods import BASE, RUNS
from test_train import CARL, load, read_log, run_main

STEPS, STEPS_PER_EPOCH, BATCH = 3, 2, 8
CONFIGS = {"carl": ["--method", "carl"],
           "carp": ["--method", "carp", "--num-prototypes", "100", "--block-size", "25"],
           **{k: v for k, v in RUNS.items() if k != "carl-teacher"}}  # carp-neurips23 has a teacher
QUEUE = ["--queue-size", "32"]  # 2 x 8 rows a step: full (SwAV) and wrapped round (MoCo) at step 2
TOL = dict(rtol=1e-4, atol=1e-5)  # losses and stats; measured: <= 1e-6 apart
MOVED = 0.1  # state: apart by this much of how far the eager steps moved it; measured: <= 3e-2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs from a clean torch._dynamo, and leaves none behind, also
    when it fails."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def assert_moved_alike(got, ref, start):
    """Each tensor of `got` (a state_dict) is `ref`'s up to MOVED times ref's distance from
    `start`. The compiled graphs round differently (their own operation order, a float32 lr), and
    at this size 3 steps grow that to ~3% (as much as eager steps on views scaled by 1 + 1e-6
    differ); a wrong update would be as far off as an update."""
    for k, v in ref.items():
        if v.is_floating_point():
            moved = (v - start[k]).norm()
            assert (got[k] - v).norm() <= MOVED * moved + 1e-7, (k, (got[k] - v).norm(), moved)


def aot_eager(monkeypatch):
    """torch.compile as build_run calls it, but with the aot_eager backend; returns the modes."""
    real, modes = torch.compile, []

    def compile_(fn, mode=None):
        modes.append(mode)
        return real(fn, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_)
    return modes


def steps(argv, compile_):
    """A run of `argv` after STEPS steps on fixed random views: (run, its state at the start, its
    [(loss, stats)] and the number of graphs made after each step)."""
    args = train.parse_args([*argv, "--compile" if compile_ else "--no-compile"])
    run = train.build_run(args, torch.device("cpu"), 1, steps_per_epoch=STEPS_PER_EPOCH)
    start = state(run)
    g = torch.Generator().manual_seed(0)
    sizes = [args.image_size] * args.global_crops + [args.local_size] * args.local_crops
    out, graphs = [], []
    for step in range(STEPS):
        views = [torch.randn(BATCH, 3, s, s, generator=g) for s in sizes]
        now = train.schedule_values(run, step)
        loss, stats = train.train_step(run, views, now, step)
        out.append((loss.detach(), {k: v.detach() for k, v in stats.items()}))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return run, start, out, graphs


def state(run):
    """What a step changes, as one flat dict of tensors (copies)."""
    parts = {"model": run.model.state_dict(),
             "momentum": {str(i): run.optimizer.state[p]["momentum_buffer"]
                          for i, p in enumerate(run.model.parameters())},
             "teacher": run.teacher.net.state_dict() if run.teacher else {},
             "queue": {"rows": run.queue.rows} if run.queue else {}}
    return {f"{part} {k}": v.clone() for part, d in parts.items() for k, v in d.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_matches_eager(name, monkeypatch):
    """Losses and stats within TOL at every step; the state after 3 steps (student, BatchNorm,
    momentum, teacher, queue rows) within MOVED of how far the steps moved it, the queue's place
    the same; the graphs made once and broken only where torch breaks them."""
    argv = [*CONFIGS[name], *BASE, "--batch-size", str(BATCH), "--amp", "off"]
    if "--queue-size" in argv:
        argv += QUEUE
    eager, start, eager_out, eager_graphs = steps(argv, False)
    assert eager_graphs == [0] * STEPS  # nothing compiled: the counts below are the compiled run's
    aot_eager(monkeypatch)
    compiled, compiled_start, compiled_out, graphs = steps(argv, True)

    torch.testing.assert_close(compiled_start, start, rtol=0, atol=0)
    for (loss, stats), (ref, ref_stats) in zip(compiled_out, eager_out):
        torch.testing.assert_close(loss, ref, **TOL)
        torch.testing.assert_close(stats, ref_stats, **TOL)
    assert_moved_alike(state(compiled), state(eager), start)
    if eager.queue is not None:
        assert (compiled.queue.ptr, compiled.queue.filled) == (eager.queue.ptr, eager.queue.filled)
        assert eager.queue.full and eager.queue.ptr == 16  # full, wrapped round for MoCo

    # One set of graphs for every step: SwAV's second set at step 2 (its prototypes learn and its
    # queue is full from there); graph breaks only at backward and in torch.optim's own step.
    assert graphs[0] >= 2  # the forward and loss; the optimizer step
    assert graphs[1] == graphs[0] and (graphs[2] == graphs[1]) == (name != "swav"), graphs
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert all("backward" in b or "graph_break()" in b for b in breaks), list(breaks)


def test_compile_mode_and_device_lr(monkeypatch):
    """--compile-mode reaches torch.compile; under --compile the optimizer's lr is a device tensor
    that each step fills (a float in eager steps)."""
    modes = aot_eager(monkeypatch)
    argv = [*CONFIGS["carp"], *BASE, "--batch-size", str(BATCH), "--amp", "off"]
    args = train.parse_args([*argv, "--compile", "--compile-mode", "reduce-overhead"])
    run = train.build_run(args, torch.device("cpu"), 1, steps_per_epoch=STEPS_PER_EPOCH)
    assert modes == ["reduce-overhead"]
    assert all(isinstance(g["lr"], torch.Tensor) for g in run.optimizer.param_groups)
    assert "compile_mode" in train.MAY_CHANGE  # a speed setting: a continued run may change it
    eager = train.build_run(train.parse_args(argv), torch.device("cpu"), 1, STEPS_PER_EPOCH)
    assert all(isinstance(g["lr"], float) for g in eager.optimizer.param_groups)


def test_a_compiled_runs_checkpoint_continues_without_compile(monkeypatch, tmp_path):
    """run.pt of a --compile run holds the optimizer's lr as a tensor; the same command under
    --no-compile continues it, with a float lr (torch.compile faked: the step runs as it is)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    out = str(tmp_path / "r")
    run_main([*CARL, "--until-epoch", "1", "--compile", "--out-dir", out])
    assert all(isinstance(g["lr"], torch.Tensor)
               for g in load(f"{out}/run.pt")["optimizer"]["param_groups"])
    run_main([*CARL, "--no-compile", "--out-dir", out])
    ckpt = load(f"{out}/run.pt")
    assert ckpt["step"] == 6 and all(isinstance(g["lr"], float)
                                     for g in ckpt["optimizer"]["param_groups"])
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(6))


@needs_cxx
def test_partition_from_a_device_step_under_inductor():
    """CARP's partition, compiled by inductor with the step as a 0-d tensor: the eager one of the
    same (seed, step) for every step, from one graph."""
    partition = torch.compile(losses.random_partition)
    for step in (0, 1, 2, 1234567):
        got = partition(120, 30, 7, torch.tensor(step))
        assert torch.equal(got, losses.random_partition(120, 30, 7, step)), step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@needs_cxx
def test_lars_with_a_device_lr_under_inductor():
    """LARS (trust-ratio and excluded groups) compiled by inductor, its lr a device tensor filled
    each step: the eager steps with a float lr, no graph break, no new graph for a new lr."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 4, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in weights] for _ in range(3)]

    def optimizer(lr):
        params = [w.clone().requires_grad_() for w in weights]
        groups = [{"params": params[:1]}, {"params": params[1:], "lars_exclude": True,
                                             "weight_decay": 0.0}]
        return params, lars.LARS(groups, lr=lr, weight_decay=1e-2, momentum=0.9)

    eager_params, eager = optimizer(0.0)
    params, compiled = optimizer(torch.tensor(0.0))
    step, graphs = torch.compile(compiled.step), []
    for i, lr in enumerate((0.5, 0.3, 0.1)):
        for group in eager.param_groups:
            group["lr"] = lr
        for group in compiled.param_groups:
            group["lr"].fill_(lr)
        for p, q, grad in zip(params, eager_params, grads[i]):
            p.grad, q.grad = grad.clone(), grad.clone()
        eager.step()
        step()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert graphs[1] == graphs[2], graphs  # (the first step made the momentum buffers: its own)
    assert not torch._dynamo.utils.counters["graph_break"]  # the lr is not read on the host
