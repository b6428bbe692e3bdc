"""Distributed calibration and evaluation: 2 gloo processes on the CPU give the single-process results.

The workers run the real CLI commands (``meansparse calibrate`` / ``meansparse evaluate``) with the
environment torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR/PORT), so ``distributed.launch``, the sharding,
the exact merge of the moment accumulators and the per-round gathering of attack results are all exercised.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import meansparse as ms
from meansparse import distributed
from meansparse.data import ImageSet
from meansparse.evaluation import Report

pytest.importorskip("sklearn")  # the digits data set

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(ckpt: str, out: str, state: str) -> tuple[list[str], list[str]]:
    """Calibrate into OUT/state.safetensors; evaluate the model with ``state`` (the same file for both runs:
    float64 merges in another order may move a float32 statistic by one ulp, which changes the model hash)."""
    calibrate = ["calibrate", "--checkpoint", ckpt, "--data", "digits", "--n-examples", "150", "--batch-size", "16",
                 "--alpha", "0.3", "--out", os.path.join(out, "state.safetensors"), "--no-progress", "--device", "cpu"]
    evaluate = ["evaluate", "--checkpoint", ckpt, "--meansparse", state,
                "--data", "digits", "--n-examples", "14", "--batch-size", "3", "--eps", "1/10", "--cascade",
                "--attacks", "apgd-ce,bpda-apgd-ce,square", "--option", "apgd-ce.steps=3", "--option",
                "square.queries=6", "--out", os.path.join(out, "eval"), "--no-progress", "--device", "cpu"]
    return calibrate, evaluate


def _worker(rank: int, ckpt: str, out: str, state: str, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from meansparse.cli import main

    calibrate, evaluate = _commands(ckpt, out, state)
    assert main(calibrate) == 0
    os.environ["MASTER_PORT"] = str(port + 1)  # a fresh rendezvous for the second command
    assert main(evaluate) == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from meansparse.models import create_model, save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    from meansparse.data import load_dataset

    torch.manual_seed(0)
    net = create_model("small_cnn", width=4, normalization="digits")
    train = load_dataset("digits", "train")
    x, y = train.float(), train.labels
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # a few epochs of plain training: most test digits right, some robust at eps 0.1
        for s in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[s:s + 64]), y[s:s + 64]).backward()
            opt.step()
    net.eval()
    save_checkpoint(net, d / "ckpt", {"model": "small_cnn", "model_kwargs": {"width": 4, "normalization": "digits"}})
    return str(d / "ckpt.safetensors")


def test_two_ranks_match_one_process(checkpoint, tmp_path, capsys):
    from meansparse.cli import main

    single, multi = tmp_path / "single", tmp_path / "multi"
    state = str(single / "state.safetensors")
    calibrate, evaluate = _commands(checkpoint, str(single), state)
    assert main(calibrate) == 0
    assert main(evaluate) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["images"] == 150 and summary["ranks"] == 1 and summary["sites"] == 3
    port = _free_port()
    mp.spawn(_worker, args=(checkpoint, str(multi), state, port), nprocs=WORLD, join=True)

    a, b = load_file(single / "state.safetensors"), load_file(multi / "state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("num_samples") or k.endswith("alpha"):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert int(a["site.0.num_samples"][0]) == 150 * 8 * 8  # every image once: no padding, no overlap

    ra = Report.from_json((single / "eval" / "report.json").read_text())
    rb = Report.from_json((multi / "eval" / "report.json").read_text())
    assert ra.comparable() == rb.comparable()
    assert rb.metadata["run"]["world_size"] == WORLD
    assert 0 < ra.clean_accuracy and sum(m == 1 for m in ra.robust_masks["apgd-ce"]) > 0  # attacks had work
    done = json.loads((multi / "eval" / "state.json").read_text())["batches"]  # rank 0 wrote every batch
    assert sorted(done["apgd-ce"], key=int) == [str(i) for i in range(len(done["apgd-ce"]))]
    assert len(done["apgd-ce"]) >= 3  # more batches than ranks: several gathering rounds


def test_helpers_without_process_group():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(3) == 3
    assert distributed.sum_over_ranks(5) == 5
    t = torch.arange(3)
    assert len(distributed.all_gather(t)) == 1 and distributed.all_gather(t)[0] is t
    distributed.barrier()
    assert distributed.shard_indices(7, 1, 3).tolist() == [1, 4]
    data = ImageSet(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5))
    assert distributed.shard(data) is data
    parts = [distributed.shard(data, r, 2).labels.tolist() for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="outside"):
        distributed.shard_indices(5, 2, 2)
    with distributed.launch("cpu") as device:  # no WORLD_SIZE: nothing to initialise
        assert device == "cpu" and not distributed.is_initialized()


def test_calibrate_merges_ranks_through_moments(monkeypatch, build_model):
    """ms.calibrate folds every rank's accumulator in (all_reduce is called whenever a group exists)."""
    called = []
    real = ms.core.Moments.all_reduce

    def spy(self, group=None):
        called.append(self.channels)
        return real(self, group)

    monkeypatch.setattr(ms.core.Moments, "all_reduce", spy)
    model = ms.prepare(build_model("se"))
    ms.calibrate(model, [torch.rand(2, 3, 16, 16)], progress=False)
    assert len(called) == len(ms.operators(model))
