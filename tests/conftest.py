"""Shared test set-up. Tests marked `slow` (whole torchrun jobs and real subprocesses, each 10-20 s)
run by default, as in CI; `python -m pytest -q tests -m "not slow"` leaves them out for a quick
loop."""
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# torch.compile's inductor backend on the CPU writes and builds C++
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                               reason="inductor on the CPU needs a C++ compiler (g++ or c++)")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core CPU, 2 OpenMP threads spin and run ~3x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """data.load_images caches decoded ImageFolder trees under $XDG_CACHE_HOME: not the user's
    here."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: starts whole torchrun jobs or train.py processes (10-20 s each)")
