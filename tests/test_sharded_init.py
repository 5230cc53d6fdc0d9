"""Building on the meta device, sharding, then initialising only the local shards
(``init_weights``): every parameter is drawn as the constructor draws it, and a 2-process FSDP2
model made this way trains."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import swinv2

SWITCHES = [
    {},
    dict(ape=True, position_bias="table"),
    dict(attn_type="dot", qkv_bias=False, norm_placement="sandwich", extra_norm_period=1),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_init_weights_after_to_empty_draws_like_the_constructor(switches):
    torch.manual_seed(0)
    built = swinv2.create_model("swinv2_debug", embed_dim=64, **switches)
    model = swinv2.create_model("swinv2_debug", embed_dim=64, device="meta", **switches)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # so a parameter the helper misses shows
    model.init_weights()
    got, want = dict(model.named_parameters()), dict(built.named_parameters())
    assert got.keys() == want.keys()
    for name, w in want.items():
        g, w = got[name].detach(), w.detach()
        assert torch.isfinite(g).all(), name
        if w.min() == w.max():  # zeros, ones, ln(10): exactly the constructor's
            assert torch.equal(g, w), name
        elif w.numel() >= 4096:  # random: the same spread
            assert float(g.std()) == pytest.approx(float(w.std()), rel=0.1), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_step(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from swinv2.train.distributed import Dist, wrap_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = swinv2.create_model("swinv2_debug", img_size=32, device="meta", drop_path_rate=0.0)
    wrap_model(model, Dist(rank, 2, rank, torch.device("cpu")), "fsdp")
    model.to_empty(device="cpu")
    torch.manual_seed(rank)
    model.init_weights()
    held = sum(p.to_local().numel() for p in model.parameters())
    qkv = model.layers[0].blocks[0].attn.qkv.weight.full_tensor()  # collective: the initial weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    if rank == 0:
        torch.save(dict(held=held, losses=losses, qkv=qkv), out)
    dist.destroy_process_group()


def test_two_processes_initialise_only_their_shards_and_train(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_sharded_step, args=(_free_port(), out), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    total = sum(p.numel() for p in swinv2.create_model("swinv2_debug", device="meta").parameters())
    assert r["held"] < 0.6 * total  # each process holds about half
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    half = r["qkv"].shape[0] // 2  # FSDP shards dim 0: the two processes' rows differ (seeded apart)
    assert not torch.equal(r["qkv"][:half], r["qkv"][half:])
