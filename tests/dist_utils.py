# Copyright (c) mmcbn contributors. All rights reserved.
"""Run a function in several gloo processes, with a deadlock guard."""
import multiprocessing
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errors):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group('gloo', rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: B902 (report everything to the parent)
        errors.put((rank, traceback.format_exc()))
        raise


def run_processes(fn, world_size=2, args=(), timeout=300):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh gloo
    processes; fail with the child's traceback, or if they do not finish
    within ``timeout`` seconds (a deadlock)."""
    ctx = multiprocessing.get_context('spawn')
    errors = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry,
                    args=(rank, world_size, port, fn, args, errors))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    if alive:
        raise AssertionError(
            f'{len(alive)} of {world_size} processes did not finish within '
            f'{timeout} s (deadlock?)')
    if not errors.empty():
        rank, text = errors.get()
        raise AssertionError(f'rank {rank} failed:\n{text}')
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, codes


def run_and_load(fn, out_dir, world_size=2, timeout=600):
    """Run ``fn(rank, world_size, out_dir)`` in ``world_size`` gloo
    processes; each saves its results to ``<out_dir>/rank<r>.pt``. Returns
    them, rank by rank."""
    import torch
    run_processes(fn, world_size, (str(out_dir), ), timeout=timeout)
    return [torch.load(os.path.join(str(out_dir), f'rank{r}.pt'))
            for r in range(world_size)]
