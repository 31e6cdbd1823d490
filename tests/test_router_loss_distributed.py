"""Two processes (gloo, CPU) × batch 4 give the same update as one process × batch 8 with the router loss on."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_router_loss_training import _assert_same, _expected_grad, _train_once


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import pathlib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    update = _train_once(pathlib.Path(out_dir) / f"rank{rank}", "mixtral", 4, 1, True)
    if rank == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        torch.save({"update": update, "world_size": world}, os.path.join(out_dir, "update.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "update.pt")
    assert saved["world_size"] == 2
    update = saved["update"]
    _assert_same(update, _expected_grad("mixtral", with_lm=True))
    router_only = _expected_grad("mixtral", with_lm=False)
    assert any(v.abs().max() > 1e-4 for n, v in router_only.items() if ".gate." in n)
