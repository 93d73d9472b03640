"""A table of malformed and hostile inputs against the launchers (issue 13), run in-process.

Each row builds its inputs under the test's folder, calls one launcher's ``main(argv)`` and checks
what a user sees and what is left on disk:

- the exit status (``launch/train.py``: 2 config errors, 1 run errors; the others: 2);
- the message: no traceback, at most two lines (a ConfigError's header and its one problem), naming
  the file or key that is wrong;
- no input file changed (model, data, configs, run folders; a run folder's ``train.log`` may gain
  the error line, which it must then hold);
- nothing half-written: no ``*.tmp`` file anywhere, no ``metrics.json`` or ``adapter/`` of a failed
  run, and no output folder at all for an error found before training starts.

The table covers the failures of issue 13 (run folders that would run code, overwrite of folders
that are not runs, damaged weights / checkpoints / pickles, runaway training, one-class data,
``data.max_length=1``, invalid matrix cells) and the data and config errors that already worked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.training import run_training
from pipeline.testing import load_script

REPO = Path(__file__).resolve().parents[1]


def _launcher(name: str):
    """launch/<name>.py as a module (launch/ is not a package)."""
    return load_script(f"launch/{name}.py")


def _train_overrides(out: Path, model_dir: Path, data_root: Path) -> list[str]:
    return [
        f"output_dir={out}", f"model.name_or_path={model_dir}", f"data.root={data_root}", "data.dataset=toy",
        "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "train.epochs=1", "train.max_steps=2",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "train.device=cpu", "method=lora",
        "train.checkpoint_every_steps=1",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir, tiny_data_root) -> tuple[Path, list[str]]:
    """A finished two-step LoRA run (config.yaml, adapter/, metrics.json, checkpoints/last) and its overrides."""
    out = tmp_path_factory.mktemp("sweep_run") / "run"
    overrides = _train_overrides(out, tiny_bert_dir, tiny_data_root)
    run_training(load_config(None, overrides))
    return out, overrides


@dataclass
class Env:
    """What a table row builds on: the test folder, the tiny model, the toy data and a finished run."""

    tmp: Path
    model: Path
    data: Path
    run: Path
    run_overrides: list[str]

    def copy(self, source: Path, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(source, target, symlinks=True)
        return target

    def run_copy(self) -> Path:
        """A copy of the finished run, for a row that damages it (its config names the copy)."""
        target = self.copy(self.run, "run")
        saved = yaml.safe_load((target / "config.yaml").read_text())
        saved["output_dir"] = str(target)
        (target / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        shutil.copyfile(target / "config.yaml", self.tmp / "run_config.yaml")  # resume_args' --config
        return target

    def train_args(self, *extra: str, out: Path | None = None, model: Path | None = None, data: Path | None = None) -> list[str]:
        return _train_overrides(out or self.tmp / "out", model or self.model, data or self.data) + list(extra)

    def resume_args(self, run: Path, *extra: str) -> list[str]:
        """``--config <the run's config.yaml before damage> resume=true``: how a user resumes a run."""
        return ["--config", str(self.tmp / "run_config.yaml"), "resume=true", *extra]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _data_copy(env: Env, edit: Callable[[Path], None]) -> Path:
    root = env.copy(env.data, "data")
    edit(root / "toy" / "1" / "badnets" / "clean" / "0.1" / "train-poison.csv")
    return root


def _one_class(path: Path) -> None:
    lines = path.read_text().splitlines()
    rows = [line.rsplit(",", 2)[0] + ",1," + line.rsplit(",", 1)[1] for line in lines[1:]]
    path.write_text("\n".join([lines[0], *rows]) + "\n")


def _bad_label(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[3] = '2,"a broken row",abc,0'
    path.write_text("\n".join(lines) + "\n")


def _damaged_model(env: Env, edit: Callable[[Path], None]) -> Path:
    model = env.copy(env.model, "model")
    edit(model)
    return model


def _corrupt_json(path: Path) -> None:
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


class _Payload:
    """A pickle that calls a function on load: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def _crafted_optimizer(run: Path) -> None:
    torch.save({"optimizer": _Payload(), "scheduler": {}}, run / "checkpoints" / "last" / "optimizer.pt")


def _remote_code_run(env: Env) -> Path:
    """A run folder whose config sets trust_remote_code and whose model (inside it) ships code that
    writes a marker file when imported."""
    run = env.run_copy()
    model = env.copy(env.model, "run/model")
    marker = env.tmp / "CODE_RAN"
    (model / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig\n\n\nclass EvilConfig(BertConfig):\n    model_type = 'bert'\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["name_or_path"] = str(model)
    saved["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run


def _edit_run_config(run: Path, **changes) -> None:
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__") if "__" in dotted else (None, dotted)
        (saved[section] if section else saved)[key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


def _grid(env: Env, text: str) -> Path:
    path = env.tmp / "grid.yaml"
    path.write_text(f"output_root: {env.tmp / 'grid_out'}\n" + text)
    return path


@dataclass(frozen=True)
class Case:
    """One row: ``build(env) -> argv`` for ``launcher``; the exit status; words the message must hold."""

    name: str
    launcher: str
    build: Callable[[Env], list[str]]
    status: int
    needles: tuple[str, ...]
    writes: bool = False  # the run starts (writes config.yaml, log.jsonl, train.log) before the error


def _symlinked_output(env: Env) -> list[str]:
    target = env.tmp / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("not a run")
    (env.tmp / "out").symlink_to(target)
    return ["--config", str(REPO / "launch/configs/demo.yaml"), *env.train_args("overwrite=true")]


def _foreign_output(env: Env, *flags: str) -> list[str]:
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "thesis.tex").write_text("a user's file")
    return env.train_args(*flags)


CASES = [
    # --- launch/train.py: configuration (worked before issue 13)
    Case("train-unknown-key", "train", lambda e: e.train_args("train.lrr=1"), 2, ("train.lrr",)),
    Case("train-bad-value", "train", lambda e: e.train_args("train.lr=fast"), 2, ("train.lr", "fast")),
    Case("train-missing-config", "train", lambda e: ["--config", str(e.tmp / "nope.yaml")], 2, ("nope.yaml",)),
    Case("train-bad-yaml", "train",
         lambda e: ["--config", str(_write(e.tmp / "bad.yaml", "method: [lora\n"))], 2, ("bad.yaml",)),
    Case("train-missing-model", "train", lambda e: e.train_args(model=e.tmp / "no_such_model"), 1, ("no_such_model",)),
    Case("train-unknown-attack", "train", lambda e: e.train_args("data.attack=badnetz"), 1, ("badnetz",)),
    Case("train-bad-label", "train", lambda e: e.train_args(data=_data_copy(e, _bad_label)), 1, ("train-poison.csv:4", "abc")),
    Case("train-existing-dir", "train", lambda e: _foreign_output(e), 1, ("already exists", "overwrite=true")),
    # --- launch/train.py: issue 13
    Case("train-overwrite-foreign-dir", "train", lambda e: _foreign_output(e, "overwrite=true"), 1, ("thesis.tex", "not one")),
    Case("train-overwrite-symlink", "train", _symlinked_output, 1, ("symbolic link",)),
    Case("train-one-class", "train", lambda e: e.train_args(data=_data_copy(e, _one_class)), 1, ("train-poison.csv", "label 1")),
    Case("train-max-length-1", "train", lambda e: e.train_args("data.max_length=1"), 1, ("data.max_length=1",)),
    Case("train-corrupt-config-json", "train",
         lambda e: e.train_args(model=_damaged_model(e, lambda m: _corrupt_json(m / "config.json"))), 1, ("config.json",)),
    Case("train-truncated-model", "train",
         lambda e: e.train_args(model=_damaged_model(e, lambda m: _truncate(m / "model.safetensors"))), 1, ("model.safetensors",)),
    Case("train-lr-1e10", "train", lambda e: e.train_args("train.lr=1e10", "train.max_steps=4"), 1,
         ("DivergenceError", "step 0", "trainable-parameter norm"), writes=True),
    Case("train-lr-1e38", "train", lambda e: e.train_args("train.lr=1e38"), 1, ("DivergenceError", "step 0", "overflowed"), writes=True),
    Case("resume-truncated-trainable", "train",
         lambda e: (r := e.run_copy(), _truncate(r / "checkpoints/last/trainable.safetensors"))[0] and e.resume_args(r), 1,
         ("trainable.safetensors", "truncated")),
    Case("resume-truncated-optimizer", "train",
         lambda e: (r := e.run_copy(), _truncate(r / "checkpoints/last/optimizer.pt"))[0] and e.resume_args(r), 1,
         ("optimizer.pt", "truncated")),
    Case("resume-crafted-pickle", "train",
         lambda e: (r := e.run_copy(), _crafted_optimizer(r))[0] and e.resume_args(r), 1, ("optimizer.pt", "refused")),
    Case("resume-corrupt-config-yaml", "train",
         lambda e: (r := e.run_copy(), (r / "config.yaml").write_text("method: [lora\n"))[0] and e.resume_args(r), 1,
         ("config.yaml", "not valid YAML")),
    Case("resume-changed-lr", "train", lambda e: e.resume_args(e.run_copy(), "train.lr=5e-4"), 1, ("train.lr",)),
    Case("resume-without-checkpoint", "train",
         lambda e: (r := e.run_copy(), shutil.rmtree(r / "checkpoints"))[0] and e.resume_args(r), 1, ("no complete checkpoint",)),
    # --- launch/evaluate.py (and defend.py / filter_data.py, which rebuild runs the same way)
    Case("evaluate-missing-dir", "evaluate", lambda e: [str(e.tmp / "nowhere")], 2, ("nowhere", "does not exist")),
    Case("evaluate-not-a-run", "evaluate",
         lambda e: [str(_write(e.tmp / "x" / "notes.txt", "hi").parent)], 2, ("config.yaml",)),
    Case("evaluate-corrupt-metrics", "evaluate",
         lambda e: (r := e.run_copy(), (r / "metrics.json").write_text("{"))[0] and [str(r)], 2, ("metrics.json",)),
    Case("evaluate-unknown-config-key", "evaluate",
         lambda e: (r := e.run_copy(), _edit_run_config(r, colour="blue"))[0] and [str(r)], 2, ("colour",)),
    Case("evaluate-truncated-adapter", "evaluate",
         lambda e: (r := e.run_copy(), _truncate(r / "adapter/adapter.safetensors"))[0] and [str(r), "--device", "cpu"], 2,
         ("adapter.safetensors",)),
    Case("evaluate-truncated-model", "evaluate",
         lambda e: (r := e.run_copy(), _edit_run_config(
             r, model__name_or_path=str(_damaged_model(e, lambda m: _truncate(m / "model.safetensors")))))[0]
         and [str(r), "--device", "cpu"], 2, ("model.safetensors",)),
    Case("evaluate-corrupt-config-json", "evaluate",
         lambda e: (r := e.run_copy(), _edit_run_config(
             r, model__name_or_path=str(_damaged_model(e, lambda m: _corrupt_json(m / "config.json")))))[0]
         and [str(r), "--device", "cpu"], 2, ("config.json", "damaged")),
    Case("evaluate-missing-data-root", "evaluate", lambda e: [str(e.run), "--data-root", str(e.tmp / "no_data")], 2, ("no_data",)),
    Case("evaluate-remote-code", "evaluate", lambda e: [str(_remote_code_run(e)), "--device", "cpu"], 2,
         ("trust_remote_code", "--trust-remote-code")),
    Case("defend-remote-code", "defend", lambda e: [str(_remote_code_run(e)), "--defense", "strip", "--device", "cpu"], 2,
         ("--trust-remote-code",)),
    Case("filter-remote-code", "filter_data",
         lambda e: [str(_remote_code_run(e)), "--method", "bki", "--out-root", str(e.tmp / "filtered"), "--device", "cpu"], 2,
         ("--trust-remote-code",)),
    # --- launch/matrix.py and launch/make_poison.py
    Case("matrix-unknown-key", "matrix", lambda e: ["--config", str(_grid(e, "attacks: [badnets]\nmethods: [lora]\ncolour: 1\n"))],
         2, ("colour",)),
    Case("matrix-invalid-cell", "matrix",
         lambda e: ["--config", str(_grid(e, "attacks: [badnets]\nmethods: [lora, lorra]\n"))], 2, ("lorra", "nothing ran")),
    Case("make-poison-missing-source", "make_poison",
         lambda e: ["--source", str(e.tmp / "no_source"), "--out-root", str(e.tmp / "poisoned"), "--attack", "badnets"], 2,
         ("no_source",)),
]


def _files(*roots: Path) -> dict[Path, str]:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_refused_cleanly(case, tmp_path, tiny_bert_dir, tiny_data_root, finished_run, capsys, caplog):
    env = Env(tmp_path, tiny_bert_dir, tiny_data_root, *finished_run)
    argv = case.build(env)
    inputs = (tmp_path, tiny_bert_dir, tiny_data_root, finished_run[0])
    before = _files(*inputs)
    main = _launcher(case.launcher).main
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status = main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("launch")]
    stderr = capsys.readouterr().err
    message = "\n".join(errors + [line for line in stderr.splitlines() if line.startswith(("error:", "  - "))])

    assert status == case.status, message or stderr[-2000:]
    assert "Traceback" not in stderr and message, stderr[-2000:]
    assert len(message.strip().splitlines()) <= 2, message
    for needle in case.needles:
        assert needle in message, (needle, message)

    after = _files(*inputs)
    logs = {p for p in after if p.name == "train.log"}
    for path, digest in before.items():
        if path.name != "train.log" and not (case.writes and path.is_relative_to(tmp_path / "out")):
            assert after.get(path) == digest, f"{path} changed or vanished"
    new = set(after) - set(before) - logs
    assert not [p for p in after if ".tmp" in p.name], "half-written files left"
    if case.writes:
        assert not any(p.name == "metrics.json" or "adapter" in p.parts for p in new), sorted(new)
    else:
        assert not new and not logs - set(before), f"files written by a refused command: {sorted(new | logs - set(before))}"
    for log in logs:
        if after[log] != before.get(log):  # a run that started records why it stopped in its train.log
            assert case.needles[0] in log.read_text(), f"{log} lacks the fatal error"
    if case.name.endswith("remote-code"):
        assert not (tmp_path / "CODE_RAN").exists(), "code from the run folder ran"
