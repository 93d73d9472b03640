"""Two nodes on loopback: the multi-node path of pipeline/distributed.py against one process.

Each "node" is its own ``torchrun --nnodes 2 --node_rank N --master_addr 127.0.0.1`` agent with its
own working directory, started with ``tests/rank_probe.py`` in place of ``launch/train.py``; the
probe records, per global rank, the files the rank writes, what it prints to a (pretend) terminal
and the optimizer / RNG state it hands to a checkpoint. Checked: the adapter and the losses equal
one process's (ZeRO-2, ZeRO-3, DDP, and 2 ranks per node, where local rank != global rank on node
1); only global rank 0 writes files, logs and progress; every rank's optimizer partition and RNG
state reach ``ranks.pt`` in global-rank order; both nodes killed mid-run and restarted with
``resume=true`` end with the same weights and records as an uninterrupted run; an output folder
the nodes do not share is refused at start, leaving nothing behind. The 4-rank ZeRO-2 case and the
refusal run by default (about a minute on 2 cores); the rest is marked slow and run by
``benchmarks/multinode_tests.sh`` (docs/BENCHMARKS.md has its measured run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import CONFIG, REPO, TOL, _assert_same_run, _free_port, _overrides, no_dropout_models  # noqa: F401

from pipeline.config import ConfigError, load_config
from pipeline import distributed as dist
from pipeline.distributed import init_runtime
from pipeline.training import run_training

PROBE = Path(__file__).with_name("rank_probe.py")
STEPS = ("train.max_steps=6", "train.checkpoint_every_steps=3")
# Record fields that measure time or memory: they differ between any two runs.
_UNTIMED = ("seconds", "memory", "_mb", "samples_per_second")


def test_a_world_without_rendezvous_address_is_refused(monkeypatch):
    # e.g. RANK/WORLD_SIZE exported by hand or by a scheduler, one process per node without a launcher:
    # each would otherwise train alone and write into the same output_dir.
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but MASTER_ADDR is not set"):
        init_runtime(use_deepspeed=False, device=torch.device("cpu"))
    assert os.environ["WORLD_SIZE"] == "2"  # nothing rewritten


def test_shared_check_wait_must_be_a_number(monkeypatch):
    monkeypatch.setenv("MUSCLELORA_SHARED_CHECK_SECONDS", "soon")
    with pytest.raises(ConfigError, match="MUSCLELORA_SHARED_CHECK_SECONDS='soon': expected a number of seconds"):
        dist._shared_check_seconds()
    monkeypatch.setenv("MUSCLELORA_SHARED_CHECK_SECONDS", "2.5")
    assert dist._shared_check_seconds() == 2.5


def _launcher(launcher: str, node: int, port: int, nproc: int, tmp: Path) -> list[str]:
    """The command that starts node ``node`` of two with each multi-node launcher the README documents."""
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc),
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    if launcher == "deepspeed":  # the no-ssh form: the same hostfile on every node, one command per node
        hostfile = tmp / "hostfile"
        hostfile.write_text(f"localhost slots={nproc}\n127.0.0.1 slots={nproc}\n")
        return [str(bindir / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    assert launcher == "accelerate"
    # The shipped config names ds_configs/zero2.json relative to the repository root; the nodes run elsewhere.
    config = tmp / "accelerate_zero2.yaml"
    shipped = (REPO / "launch" / "configs" / "accelerate_zero2.yaml").read_text()
    config.write_text(shipped.replace("ds_configs/zero2.json", str(REPO / "ds_configs" / "zero2.json")))
    return [str(bindir / "accelerate"), "launch", "--config_file", str(config),
            "--num_machines", "2", "--machine_rank", str(node), "--num_processes", str(2 * nproc),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--deepspeed_multinode_launcher", "standard"]


def _nodes(args: list[str], tmp: Path, *, deepspeed: str | None, nproc: int = 1, stop_at: int | None = None,
           env: dict[str, str] | None = None, name: str = "nodes", launcher: str = "torchrun") -> tuple[list[subprocess.Popen], Path]:
    """Start two launchers (node ranks 0 and 1), each in its own empty working directory."""
    probe_dir = tmp / f"{name}-probe"
    probe_dir.mkdir()
    port = _free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp / f"{name}-cwd{node}"
        cwd.mkdir(exist_ok=True)
        command = [*_launcher(launcher, node, port, nproc, tmp), str(PROBE), "--config", str(CONFIG)]
        if deepspeed:
            command += ["--deepspeed", str(REPO / "ds_configs" / f"{deepspeed}.json")]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PROBE_DIR": str(probe_dir), **(env or {})}
        if stop_at:
            full_env["PROBE_STOP_AT"] = str(stop_at)
        with open(probe_dir / f"node{node}.log", "w") as log:
            procs.append(subprocess.Popen(command + args, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs, probe_dir


def _wait(procs: list[subprocess.Popen], probe_dir: Path, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        _kill(procs, probe_dir)


def _kill(procs: list[subprocess.Popen], probe_dir: Path) -> None:
    """SIGKILL both nodes: the agents' process groups and every worker that reported its pid."""
    for marker in probe_dir.glob("stopped-rank*"):
        try:
            os.kill(int(marker.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_nodes(args: list[str], tmp: Path, **kwargs) -> Path:
    procs, probe_dir = _nodes(args, tmp, **kwargs)
    codes = _wait(procs, probe_dir)
    if codes != [0, 0]:
        logs = "\n".join((probe_dir / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
        pytest.fail(f"nodes exited with {codes}:\n{logs}")
    return probe_dir


def _writes(probe_dir: Path, rank: int) -> list[str]:
    lines = (probe_dir / f"rank{rank}.writes").read_text().splitlines()
    return [path for line in lines for path in json.loads(line)["paths"]]


def _under(paths: list[str], folder: Path) -> list[str]:
    root = str(folder.resolve())
    return [p for p in paths if p == root or p.startswith(root + os.sep)]


def _assert_only_rank0_writes_and_talks(probe_dir: Path, out: Path, world_size: int, tmp: Path, name: str) -> None:
    assert sorted(probe_dir.glob("rank*.writes")) == sorted(probe_dir / f"rank{r}.writes" for r in range(world_size))
    assert _under(_writes(probe_dir, 0), out), "the audit hook saw no write of rank 0: the probe is broken"
    for rank in range(1, world_size):
        assert _under(_writes(probe_dir, rank), out) == [], f"rank {rank} wrote into output_dir"
    for node in (0, 1):
        assert list((tmp / f"{name}-cwd{node}").iterdir()) == [], f"something was written into node {node}'s working dir"
    rank0 = (probe_dir / "rank0.stderr").read_text()
    assert "INFO pipeline.training" in rank0 and "epoch 0: " in rank0 and "%|" in rank0  # log lines and the bar
    for rank in range(1, world_size):
        text = (probe_dir / f"rank{rank}.stderr").read_text()
        assert " INFO " not in text and "%|" not in text, f"rank {rank} logged or drew progress:\n{text[-2000:]}"


def _assert_every_rank_in_checkpoint(probe_dir: Path, out: Path, world_size: int, zero: bool) -> None:
    ranks = torch.load(out / "checkpoints" / "last" / "ranks.pt", weights_only=True)
    assert len(ranks) == world_size
    sizes = []
    for rank, saved in enumerate(ranks):
        handed = torch.load(probe_dir / f"rank{rank}.state.pt", weights_only=True)
        _assert_same_state(saved["rng"], handed["rng"], f"rank {rank} rng")
        _assert_same_state(saved["optimizer"], handed["optimizer"], f"rank {rank} optimizer")
        moments = [s["exp_avg"] for s in saved["optimizer"]["state"].values()]
        assert moments and all(m.abs().sum() > 0 for m in moments)
        sizes.append(sum(m.numel() for m in moments))
    trainable = sum(t.numel() for t in load_file(str(out / "checkpoints" / "last" / "trainable.safetensors")).values())
    if zero:  # disjoint partitions (ZeRO pads the flat buffer to a multiple of the world size)
        assert trainable <= sum(sizes) < trainable + 2 * world_size * len(ranks[0]["optimizer"]["param_groups"])
        assert max(sizes) < trainable
    else:  # DDP: every rank holds the whole state
        assert sizes == [trainable] * world_size


def _assert_same_state(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def single_bert(tmp_path_factory, no_dropout_models, tiny_data_root) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run_training(load_config(CONFIG, _overrides(out, no_dropout_models["bert"], tiny_data_root, *STEPS)))
    return out


def _check_two_node_run(out: Path, probe_dir: Path, single: Path, tmp: Path, *, world_size: int, stage: int | None) -> None:
    _assert_same_run(single, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == world_size
    assert metrics["backend"] == ("ddp" if stage is None else "deepspeed") and metrics["zero_stage"] == stage
    _assert_only_rank0_writes_and_talks(probe_dir, out, world_size, tmp, "nodes")
    _assert_every_rank_in_checkpoint(probe_dir, out, world_size, zero=bool(stage))


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize(("backend", "nproc"), [
    ("zero2", 2),  # 4 ranks: on node 1 the local ranks 0, 1 are the global ranks 2, 3
    pytest.param("zero3", 1, marks=pytest.mark.slow),
    pytest.param("ddp", 1, marks=pytest.mark.slow),
])
def test_two_nodes_match_one_process(backend, nproc, tmp_path, no_dropout_models, tiny_data_root, single_bert):
    out = tmp_path / "run"
    deepspeed = None if backend == "ddp" else backend
    probe_dir = _run_nodes(_overrides(out, no_dropout_models["bert"], tiny_data_root, *STEPS), tmp_path,
                           deepspeed=deepspeed, nproc=nproc)
    stage = None if deepspeed is None else int(backend[4])
    _check_two_node_run(out, probe_dir, single_bert, tmp_path, world_size=2 * nproc, stage=stage)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_multinode_launcher_forms_match_one_process(launcher, tmp_path, no_dropout_models, tiny_data_root, single_bert):
    out = tmp_path / "run"
    probe_dir = _run_nodes(_overrides(out, no_dropout_models["bert"], tiny_data_root, *STEPS), tmp_path,
                           deepspeed="zero2" if launcher == "deepspeed" else None, launcher=launcher)
    _check_two_node_run(out, probe_dir, single_bert, tmp_path, world_size=2, stage=2)


def _untimed(value):
    """A record without the fields that measure time or memory, and without the run's own folder / resume flag."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not any(t in k for t in _UNTIMED) and k not in ("resume", "output_dir")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _log(run: Path) -> list[dict]:
    return [_untimed(json.loads(line)) for line in (run / "log.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> dict:
    return _untimed(json.loads((run / "metrics.json").read_text()))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.integration
def test_both_nodes_killed_and_resumed_end_like_an_uninterrupted_run(tmp_path, no_dropout_models, tiny_data_root, single_bert):
    # The uninterrupted run: two nodes of one rank each, ZeRO-2.
    straight = tmp_path / "straight"
    probe_dir = _run_nodes(_overrides(straight, no_dropout_models["bert"], tiny_data_root, *STEPS), tmp_path, deepspeed="zero2")
    _check_two_node_run(straight, probe_dir, single_bert, tmp_path, world_size=2, stage=2)

    out = tmp_path / "run"
    args = _overrides(out, no_dropout_models["bert"], tiny_data_root, *STEPS)
    # Every rank stops inside step 5: the checkpoint of step 3 is complete, step 4 is logged past it.
    procs, probe_dir = _nodes(args, tmp_path, deepspeed="zero2", stop_at=5, name="killed")
    deadline = time.monotonic() + 300
    while len(list(probe_dir.glob("stopped-rank*"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (probe_dir / "node0.log").read_text()[-3000:]
        time.sleep(0.5)
    _kill(procs, probe_dir)
    progress = json.loads((out / "checkpoints" / "last" / "progress.json").read_text())
    assert progress["global_step"] == 3 and not (out / "metrics.json").exists()
    assert [r["global_step"] for r in _log(out) if r["type"] == "step"] == [1, 2, 3, 4]

    _run_nodes([*args, "resume=true"], tmp_path, deepspeed="zero2", name="resumed")
    assert _log(out) == _log(straight)
    assert _metrics(out) == _metrics(straight)
    a = load_file(str(straight / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.integration
def test_output_dir_not_shared_between_nodes_is_refused_at_start(tmp_path, no_dropout_models, tiny_data_root):
    # A relative output_dir from two working directories: each node sees its own, unshared folder.
    args = _overrides(Path("run"), no_dropout_models["bert"], tiny_data_root, *STEPS)
    procs, probe_dir = _nodes(args, tmp_path, deepspeed=None, env={"MUSCLELORA_SHARED_CHECK_SECONDS": "1"})
    codes = _wait(procs, probe_dir)
    assert codes[0] != 0 and codes[1] != 0
    rank0 = (probe_dir / "rank0.stderr").read_text()
    assert "output_dir=run: not shared between the ranks (rank 1 on host" in rank0
    assert f"looks in {tmp_path / 'nodes-cwd1' / 'run'}" in rank0 and "every node mounts" in rank0
    assert "not shared between the ranks" in (probe_dir / "rank1.stderr").read_text()
    # Nothing left behind: the folder rank 0 created for the check is gone, node 1 wrote nothing.
    assert list((tmp_path / "nodes-cwd0").iterdir()) == [] and list((tmp_path / "nodes-cwd1").iterdir()) == []
