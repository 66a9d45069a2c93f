"""use_adasum under faults, on real Gloo groups with short timeouts: a model that differs
between ranks, a parameter frozen after use_adasum, a rank that skips it, a replica that stalls
inside the reduction. Every rank raises the same error before any gradient moves, or every rank
raises within the process group's timeout; nothing waits for torch's 30-minute default."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

import adasum.fsdp
from adasum import _vhdd
from adasum._groups import timeout_of
from adasum.fsdp import use_adasum
from adasum.launch import spawn
from conftest import TIMEOUT, caught

#: The process group's timeout where a test waits for it by design, and what a rank may take on
#: top of it to notice and raise (4 ranks on 2 shared cores).
GROUP_TIMEOUT = 8.0
SLACK = 12.0


class Pair(torch.nn.Module):
    """Two layers; on 4 ranks a shard of the first weight, (8, 4), holds 8 elements, and so
    would a shard of its transpose: a transposed copy moves the same bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _mesh(kind: str, world: int) -> DeviceMesh | None:
    """None (fully_shard's 1-D mesh over the world), an HSDP mesh as init_device_mesh makes it
    (its groups wait torch's default 30 minutes), or one built from groups with the default
    group's timeout, as docs/failures.md says."""
    if kind == "fsdp":
        return None
    if kind == "hsdp":
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    ranks = torch.arange(world).view(2, world // 2)
    replicate, _ = dist.new_subgroups_by_enumeration(ranks.T.tolist(), timeout=timeout_of(None))
    shard, _ = dist.new_subgroups_by_enumeration(ranks.tolist(), timeout=timeout_of(None))
    return DeviceMesh.from_group([replicate, shard], "cpu", mesh=ranks, mesh_dim_names=("replicate", "shard"))


def _pair(mesh: DeviceMesh | None, change: Callable[[Pair], None] | None = None) -> Pair:
    torch.manual_seed(0)
    model = Pair()
    if change is not None:
        change(model)
    fully_shard(model.a, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _freeze(model: Pair) -> None:
    model.a.bias.requires_grad_(False)


def _transpose(model: Pair) -> None:
    model.a.weight = torch.nn.Parameter(model.a.weight.detach().t().contiguous())


def _wiring(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """What use_adasum changes in each FSDP parameter group."""
    groups = [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]
    return [(type(g._reduce_scatter_comm).__name__, type(g._all_reduce_hook).__name__, type(g.mesh_info).__name__)
            for g in groups]


def _refused_install(rank: int, world: int, kind: str, victim: int, change: Callable[[Pair], None]) -> dict:
    model = _pair(_mesh(kind, world), change if rank == victim else None)
    before = _wiring(model)
    return {"error": caught(lambda: use_adasum(model)), "unchanged": _wiring(model) == before}


def _frozen_later(rank: int, world: int, kind: str, frozen: set[int]) -> dict:
    """A parameter frozen on some ranks after a first backward pass (FSDP reads
    ``requires_grad`` at every forward pass): the next reduction refuses on every rank. Also the
    agreement rounds of the first backward pass: one per parameter group."""
    model = _pair(_mesh(kind, world))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the HSDP mesh's 30-minute groups
        use_adasum(model)
    counted, agree = [0], adasum.fsdp.agree

    def counting(*args, **kwargs):
        counted[0] += 1
        return agree(*args, **kwargs)

    adasum.fsdp.agree = counting
    try:
        model(torch.randn(5, 4)).sum().backward()
    finally:
        adasum.fsdp.agree = agree
    if rank in frozen:
        _freeze(model)
    return {"rounds": counted[0], "error": caught(lambda: model(torch.randn(5, 4)).sum().backward())}


def _groups_of_hooks(rank: int, world: int) -> dict:
    out = {}
    for kind in ("hsdp", "bounded"):
        mesh = _mesh(kind, world)
        model = _pair(mesh)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            hooks = use_adasum(model)
        out[kind] = {
            "warnings": [str(w.message) for w in seen],
            "timeouts": {timeout_of(h.replicate).total_seconds() for h in hooks}
            | {timeout_of(h.shards).total_seconds() for h in hooks},
            "mesh's groups": all(h.replicate is mesh.get_group("replicate") and h.shards is mesh.get_group("shard")
                                 for h in hooks),
        }
    return out


def _refusals(rank: int, world: int) -> dict:
    return {
        "install": {
            "fsdp-frozen": _refused_install(rank, world, "fsdp", 1, _freeze),
            "fsdp-transposed": _refused_install(rank, world, "fsdp", 2, _transpose),
            "hsdp-frozen": _refused_install(rank, world, "hsdp", 3, _freeze),
        },
        # HSDP: on part of a shard group, which FSDP's own reduce-scatter inside it would abort on.
        "backward": {kind: _frozen_later(rank, world, kind, {1}) for kind in ("fsdp", "hsdp")},
        "groups": _groups_of_hooks(rank, world),
    }


@pytest.fixture(scope="module")
def refusals() -> list[dict]:
    # A short group timeout: a rank left waiting fails the test fast instead of hanging it.
    return spawn(_refusals, 4, timeout=TIMEOUT, group_timeout=20)


INSTALL_ERRORS = {
    "fsdp-frozen": "ValueError: adasum: tensor 3 is a.bias (8,) float32 frozen on rank 1 but a.bias (8,) float32 on rank 0",
    "fsdp-transposed": "ValueError: adasum: tensor 2 is a.weight (4, 8) float32 on rank 2 but a.weight (8, 4) float32 on rank 0",
    "hsdp-frozen": "ValueError: adasum: tensor 3 is a.bias (8,) float32 frozen on rank 3 but a.bias (8,) float32 on rank 0",
}


@pytest.mark.parametrize("case", list(INSTALL_ERRORS))
def test_use_adasum_refuses_a_model_that_differs_between_ranks_on_every_rank(refusals, case):
    for res in refusals:
        assert res["install"][case] == {"error": INSTALL_ERRORS[case], "unchanged": True}


@pytest.mark.parametrize("kind", ["fsdp", "hsdp"])
def test_a_parameter_frozen_after_use_adasum_is_refused_on_every_rank(refusals, kind):
    # 4 rows (FSDP) or 2 (HSDP's shard group) of a's segments: 32 elements without the bias, 40 with.
    message = ("ValueError: adasum: rank 1: adasum.fsdp: the reduce-scatter input holds 32 elements, the parameter "
               "group's gradients 40: a parameter was frozen or unfrozen after use_adasum")
    assert [res["backward"][kind] for res in refusals] == [{"rounds": 2, "error": message}] * 4


def test_hsdp_reduces_over_groups_with_the_default_groups_timeout(refusals):
    for res in refusals:
        default_mesh, bounded = res["groups"]["hsdp"], res["groups"]["bounded"]
        # init_device_mesh's groups wait 30 minutes: use_adasum makes its own and says why.
        assert default_mesh["timeouts"] == {20.0} and not default_mesh["mesh's groups"]
        assert len(default_mesh["warnings"]) == 1 and "0:30:00" in default_mesh["warnings"][0]
        # A mesh built with the user's timeout is used as it is, without a warning.
        assert bounded == {"warnings": [], "timeouts": {20.0}, "mesh's groups": True}


def _skip_use_adasum(rank: int, world: int, kind: str, skipper: int) -> dict:
    """Every rank but ``skipper`` calls use_adasum, then all train one step. A rank stays alive
    after its error, as a process that catches it would: its exit must not be what unblocks
    the others."""
    model = _pair(_mesh(kind, world))
    start = time.monotonic()
    try:
        if rank != skipper:
            use_adasum(model)
        model(torch.randn(5, 4)).sum().backward()
    except RuntimeError as e:
        seconds = time.monotonic() - start
        time.sleep(GROUP_TIMEOUT + 2)
        return {"seconds": seconds, "error": str(e).splitlines()[0]}
    return {"seconds": None, "error": None}


@pytest.mark.parametrize("kind,world,skipper", [("fsdp", 2, 0), ("bounded", 4, 3)])
def test_a_rank_that_skips_use_adasum_fails_every_rank_within_the_timeout(kind, world, skipper):
    results = spawn(_skip_use_adasum, world, kind, skipper, timeout=TIMEOUT, group_timeout=GROUP_TIMEOUT)
    for rank, res in enumerate(results):
        assert res["error"] is not None and res["seconds"] < GROUP_TIMEOUT + SLACK, (rank, res)
        if rank != skipper:  # the skipper fails in FSDP's own all-gather of the forward pass
            assert res["error"].startswith("adasum.fsdp.use_adasum: not every rank of the mesh took part"), res


def _stall(*args, **kwargs) -> None:
    time.sleep(GROUP_TIMEOUT + SLACK + 5)
    raise RuntimeError("stalled")


def _stalled_replica(rank: int, world: int) -> dict:
    """HSDP on init_device_mesh's groups (30 minutes); rank 3 stalls inside the reduction
    across replicas, alive, for longer than the others may wait."""
    model = _pair(_mesh("hsdp", world))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        use_adasum(model)
    if rank == 3:
        _vhdd.run = _stall
    start = time.monotonic()
    try:
        model(torch.randn(5, 4)).sum().backward()
    except RuntimeError as e:
        return {"seconds": time.monotonic() - start, "error": str(e).splitlines()[0]}
    return {"seconds": None, "error": None}


def test_a_stalled_replica_fails_the_others_within_the_default_groups_timeout():
    results = spawn(_stalled_replica, 4, timeout=TIMEOUT, group_timeout=GROUP_TIMEOUT)
    for rank, res in enumerate(results[:3]):
        assert res["error"] is not None and res["seconds"] < GROUP_TIMEOUT + SLACK, (rank, res)
