"""Resume under FSDP2 reads the full checkpoint on rank 0 only and broadcasts it (two gloo ranks
on CPU): the other ranks never load `trainable.pt` / `optim.pt`, and every rank ends up with the
saved weights and optimiser state."""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.slow


def _model(seed: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def _step(model, optimizer) -> None:
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from blip3.train import checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # noqa: E731
        model = _model(0)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        _step(model, opt)
        ckpt = checkpoint.save_checkpoint(out, 1, model=model, optimizer=opt, scheduler=sched(opt), data_state={},
                                          meta={})
        opts = StateDictOptions(full_state_dict=True)
        want_m, want_o = get_state_dict(model, opt, options=opts)

        fresh = _model(1)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        loaded: list[str] = []
        real_load = torch.load

        def spy(path, *a, **k):
            loaded.append(str(path).rsplit("/", 1)[-1])
            return real_load(path, *a, **k)

        torch.load = spy
        try:
            checkpoint.load_checkpoint(ckpt, model=fresh, optimizer=fresh_opt, scheduler=sched(fresh_opt))
        finally:
            torch.load = real_load
        got_m, got_o = get_state_dict(fresh, fresh_opt, options=opts)
        assert want_m.keys() == got_m.keys() and all(torch.equal(want_m[k], got_m[k]) for k in want_m)
        for pid, state in want_o["state"].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(got_o["state"][pid][k])), (pid, k)
        if rank == 0:
            assert {"trainable.pt", "optim.pt"} <= set(loaded), loaded
        else:
            assert not {"trainable.pt", "optim.pt"} & set(loaded), loaded  # rank 0 reads and broadcasts
    finally:
        dist.destroy_process_group()


def test_resume_reads_the_full_checkpoint_on_rank0_only(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, str(tmp_path)), nprocs=2)
