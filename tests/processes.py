"""`spawn`: torch.multiprocessing.spawn for the tests' process groups, without the imports.

A spawned process starts a fresh interpreter that imports torch, moelab and the test module
before it runs a line of the test (4-8 s on the 2-core machine, in every rank of every group).
Here the ranks are forked from multiprocessing's forkserver instead: one fresh process, started
on the first call, that imported torch and moelab's training and distributed modules once and
never ran anything (no thread pools, no process group), so that each rank is a fresh process as
a spawned one is, minus the import time. sys.path and the working directory are the caller's
(multiprocessing sends them); the environment is the caller's at the call (set here in the rank,
as the forkserver's own is that of its start), so that each rank sees what a spawned one would.
"""

from __future__ import annotations

import multiprocessing
import os

import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "moelab.models", "moelab.train", "moelab.distributed", "moelab.compress"]


def spawn(fn, args=(), nprocs: int = 1) -> None:
    """`mp.spawn(fn, args, nprocs, join=True)`: fn(rank, *args) in nprocs processes; an exception
    in any of them is raised here (torch's ProcessRaisedException / ProcessExitedException)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    mp.start_processes(_in_env, args=(dict(os.environ), fn, *args), nprocs=nprocs, join=True, start_method="forkserver")


def _in_env(rank: int, env: dict, fn, *args) -> None:
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)
