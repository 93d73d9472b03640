"""Tests for pipeline/config.py: typed run configuration of MuScleLoRA (arXiv 2402.12026)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    AlignConfig,
    ConfigError,
    DataConfig,
    LoraConfig,
    MslrConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    describe_keys,
    load_config,
    resolve_defaults,
    uses_alignment,
    uses_lora,
    uses_mslr,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "launch" / "configs"
SECTIONS = ("model", "data", "lora", "mslr", "align", "train", "adapter", "prompt", "prefix", "analysis", "canary", "filter", "shortcut")
AUTO_KEYS = {
    "data.max_length", "data.ref_size", "lora.r", "lora.alpha", "lora.target_modules", "mslr.targets",
    "mslr.scales", "mslr.alpha", "align.min_ref_loss", "align.max_raw_ratio", "align.start_epoch",
    "train.epochs", "train.batch_size", "train.lr", "train.lr_full_finetune", "train.lr_adapters", "adapter.targets",
    "canary.target_label", "align.min_ref_grad_norm", "filter.method",
}


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _all_keys() -> set[str]:
    keys = {f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS}
    for section in SECTIONS:
        cls = typing.get_type_hints(RunConfig)[section]
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    return keys


def _get(cfg: RunConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------
# Defaults and direct construction


def test_defaults_are_valid_and_match_the_schema():
    cfg = RunConfig()
    assert load_config(None) == cfg
    assert cfg.method == "musclelora" and cfg.seed == 42 and cfg.output_dir == "runs/demo"
    assert cfg.model.name_or_path == "minilm" and cfg.model.dtype == "float32"
    assert cfg.data.root == "../shared/data/poison_data" and cfg.data.poison_rate == "0.1"
    assert cfg.data.setting == "auto" and cfg.mslr.rank == 1 and cfg.mslr.init == "kaiming"
    assert cfg.align.min_ref_grad_norm is None and cfg.recipe == "defended" and cfg.train.max_steps == -1
    assert cfg.train.eval_batch_size == 64 and cfg.train.freeze_head is True
    assert {k for k in _all_keys() if _get(cfg, k) is None} == AUTO_KEYS | {
        "data.max_train_samples", "data.max_eval_samples", "train.num_threads", "canary.seed", "align.ref_batch_size",
        "filter.threshold", "canary.trigger", "filter.teacher",
    }


def test_every_field_has_help_metadata():
    for cls in (RunConfig, *(typing.get_type_hints(RunConfig)[s] for s in SECTIONS)):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_direct_construction_reports_all_problems_of_a_section():
    with pytest.raises(ConfigError) as info:
        TrainConfig(lr=-1.0, epochs=0, warmup_ratio=1.0, device="tpu")  # type: ignore[arg-type]
    problems = info.value.problems
    assert len(problems) == 4
    assert any(re.match(r"train\.lr: got -1\.0; must be > 0", p) for p in problems)
    assert any(p.startswith("train.epochs: got 0; must be > 0") for p in problems)
    assert any(p.startswith("train.warmup_ratio: got 1.0; must be >= 0 and < 1") for p in problems)
    assert any(p.startswith("train.device: got 'tpu'; is not an allowed value") for p in problems)


def test_direct_construction_coerces_int_to_float_and_copies_lists():
    scales = [1, 2, 4]
    mslr = MslrConfig(scales=scales, alpha=6)  # type: ignore[arg-type]
    assert mslr.scales == [1.0, 2.0, 4.0] and all(type(k) is float for k in mslr.scales)
    assert type(mslr.alpha) is float
    scales.append(8)
    assert mslr.scales == [1.0, 2.0, 4.0]


def test_direct_construction_rejects_bool_for_int_and_int_for_bool():
    with pytest.raises(ConfigError, match=r"lora\.r: got True; expected int \| null"):
        LoraConfig(r=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"mslr\.keep_base: got 1; expected bool, got int"):
        MslrConfig(keep_base=1)  # type: ignore[arg-type]


def test_run_config_cross_checks():
    with pytest.raises(ConfigError, match=r"data\.target_label: got 2; must be below model\.num_labels \(2\)"):
        RunConfig(data=DataConfig(target_label=2))
    with pytest.raises(ConfigError, match=r"overwrite: got True; resume and overwrite are both true"):
        RunConfig(resume=True, overwrite=True)
    with pytest.raises(ConfigError, match=r"model: got .*expected a ModelConfig"):
        RunConfig(model={"num_labels": 2})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# YAML loading


def test_yaml_with_nested_sections(tmp_path):
    path = _write(
        tmp_path,
        "method: ga_lora\n"
        "seed: 7\n"
        "model:\n"
        "  name_or_path: /models/x\n"
        "  num_labels: 4\n"
        "data:\n"
        "  attack: addsent\n"
        "  poison_rate: 0.2\n"
        "  max_train_samples: 100\n"
        "lora:\n"
        "  r: 4\n"
        "  alpha: 16\n"
        "  target_modules: [query]\n"
        "mslr:\n"
        "  scales: [1, 2.5]\n"
        "align:\n"
        "  max_raw_ratio: 0\n"
        "train:\n"
        "  lr: 1e-4\n"
        "  freeze_head: false\n",
    )
    cfg = load_config(path)
    assert cfg.method == "ga_lora" and cfg.seed == 7
    assert cfg.model.name_or_path == "/models/x" and cfg.model.num_labels == 4
    assert cfg.data.attack == "addsent" and cfg.data.poison_rate == "0.2"
    assert cfg.data.max_train_samples == 100
    assert cfg.lora.r == 4 and cfg.lora.alpha == 16.0 and type(cfg.lora.alpha) is float
    assert cfg.lora.target_modules == ["query"] and cfg.mslr.scales == [1.0, 2.5]
    assert cfg.align.max_raw_ratio == 0.0 and type(cfg.align.max_raw_ratio) is float
    # PyYAML reads 1e-4 (no dot) as a string; a float field still accepts it.
    assert cfg.train.lr == pytest.approx(1e-4) and type(cfg.train.lr) is float
    assert cfg.train.freeze_head is False
    assert cfg.train.epochs is None and cfg.data.dataset == "sst-2"


def test_empty_section_takes_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "model:\ntrain:\n  epochs: 3\n"))
    assert cfg.model == RunConfig().model and cfg.train.epochs == 3


def test_yaml_line_numbers_in_messages(tmp_path):
    path = _write(
        tmp_path,
        "method: musclelora\n"
        "model:\n"
        "  num_labels: 2\n"
        "train:\n"
        "  lr: -1.0\n"
        "  epochs: zero\n"
        "  lrr: 3\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "invalid run configuration (3 problems):" in message
    assert f"train.lr ({path} line 5): got -1.0; must be > 0" in message
    assert f"train.epochs ({path} line 6): got 'zero'; expected int | null" in message
    assert f"train.lrr ({path} line 7): unknown key" in message


def test_several_problems_reported_together(tmp_path):
    path = _write(
        tmp_path,
        "method: musclelora\n"
        "seed: -3\n"
        "optimizer: adamw\n"
        "model:\n"
        "  dtype: fp16\n"
        "data:\n"
        "  poison_rate: '1.5'\n"
        "lora:\n"
        "  dropout: 1.0\n"
        "  target_modules: []\n"
        "mslr:\n"
        "  scales: [1, -2]\n"
        "  targets: ['(unclosed']\n"
        "align:\n"
        "  max_raw_ratio: 1.5\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.batch_size=0", "train.freeze_head=1"])
    problems = info.value.problems
    expected = [
        rf"^seed \({re.escape(str(path))} line 2\): got -3; must be >= 0",
        rf"^optimizer \({re.escape(str(path))} line 3\): unknown key",
        r"^model\.dtype .*got 'fp16'; is not an allowed value\. Fix: .*'float16'",
        r"^data\.poison_rate .*got '1.5'; must be a number in \(0, 1\)",
        r"^lora\.dropout .*got 1\.0; must be >= 0 and < 1",
        r"^lora\.target_modules .*got \[\]; must not be an empty list",
        r"^mslr\.scales .*got \[1, -2\]; item 1 \(-2\.0\) must be > 0",
        r"^mslr\.targets .*item 0 \('\(unclosed'\) is not a valid regular expression",
        r"^align\.max_raw_ratio .*got 1\.5; must be >= 0 and <= 1",
        r"^train\.batch_size \(override 'train\.batch_size=0'\): got 0; must be > 0",
        r"^train\.freeze_head \(override 'train\.freeze_head=1'\): got 1; expected bool",
    ]
    assert len(problems) == len(expected), problems
    for pattern in expected:
        assert sum(bool(re.search(pattern, p)) for p in problems) == 1, (pattern, problems)
    assert str(info.value).count("\n  - ") == len(expected)


def test_unknown_key_lists_valid_keys_and_suggestion(tmp_path):
    path = _write(tmp_path, "train:\n  learning_rat: 0.1\n  epoch: 3\nmodle:\n  num_labels: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    valid_train = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    assert f"train.epoch ({path} line 3): unknown key; valid keys in section 'train': {valid_train}" in text
    assert "Fix: rename it to 'train.epochs'" in text
    assert re.search(r"modle \(.* line 4\): unknown key; valid keys at the top level: method, recipe, seed, .*"
                     r"Fix: rename it to 'model'", text)
    assert re.search(r"train\.learning_rat .*Fix: rename it to 'train\.(lr|warmup_ratio)'", text)


def test_key_in_wrong_section_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"lr \(override 'lr=0\.1'\): unknown key.*rename it to 'train\.lr'"):
        load_config(None, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"model\.epochs .*valid keys in section 'model': name_or_path.*"
                                          r"rename it to 'train\.epochs'"):
        load_config(None, ["model.epochs=3"])


def test_bad_literal_values():
    cases = {
        "method=muscle_lora": r"method .*got 'muscle_lora'; is not an allowed value\. Fix: did you mean "
                              r"'musclelora'\? use one of 'vanilla', 'ga', 'lora', 'lora_mslr', 'ga_lora', "
                              r"'musclelora'",
        "model.dtype=fp32": r"model\.dtype .*got 'fp32'.*'float32', 'bfloat16', 'float16'",
        "mslr.init=gaussian": r"mslr\.init .*got 'gaussian'.*'kaiming', 'zero'",
        "train.device=gpu": r"train\.device .*got 'gpu'.*'auto', 'cpu', 'cuda'",
        "data.setting=mixed": r"data\.setting .*got 'mixed'.*did you mean 'mix'",
    }
    for override, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, [override])


def test_empty_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: is empty \(or only comments\)\. Fix: write a mapping"):
        load_config(_write(tmp_path, "# nothing here\n"))
    with pytest.raises(ConfigError, match=r"line 1: the top level is a list, expected a mapping"):
        load_config(_write(tmp_path, "- method\n- seed\n"))
    with pytest.raises(ConfigError, match=r"train \(.*cfg\.yaml line 1\): got 5; a section must be a mapping"):
        load_config(_write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot be read .*Fix: pass the path of an existing"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_syntax_error_and_duplicate_key_name_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml line 4, column 1: not valid YAML \(expected ',' or '\]'.*"
                                          r"while parsing a flow sequence started at line 3, column 11\)"):
        load_config(_write(tmp_path, "train:\n  lr: 0.1\n  epochs: [1, 2\n"))
    path = _write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"train\.lr \({re.escape(str(path))} line 3\): duplicate key, also set at "
                                          rf"{re.escape(str(path))} line 2; YAML would keep only the last value"):
        load_config(path)


# ---------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = _write(tmp_path, "data:\n  max_train_samples: 100\ntrain:\n  lr: 0.5\n")
    cfg = load_config(
        path,
        [
            "train.lr=1e-4",
            "mslr.scales=[1,2,4]",
            "data.max_train_samples=null",
            "model.trust_remote_code=true",
            "lora.target_modules=[q_proj, v_proj]",
            "output_dir=runs/x=y",
            "align={min_ref_loss: 0.2, start_epoch: 2}",
            "data.poison_rate=0.3",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4) and type(cfg.train.lr) is float
    assert cfg.mslr.scales == [1.0, 2.0, 4.0] and all(type(k) is float for k in cfg.mslr.scales)
    assert cfg.data.max_train_samples is None
    assert cfg.model.trust_remote_code is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.output_dir == "runs/x=y"
    assert cfg.align.min_ref_loss == 0.2 and cfg.align.start_epoch == 2
    assert cfg.data.poison_rate == "0.3"


def test_malformed_override_is_named():
    with pytest.raises(ConfigError, match=r"override 'train\.lr': expected key=value\. Fix: write e\.g\."):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"override 'mslr\.scales=\[1,2' is not valid YAML"):
        load_config(None, ["mslr.scales=[1,2"])
    with pytest.raises(ConfigError, match=r"train\.lr\.x \(override 'train\.lr\.x=1'\): keys have the form "
                                          r"section\.key"):
        load_config(None, ["train.lr.x=1"])


def test_non_finite_and_wrong_type_values_are_rejected():
    with pytest.raises(ConfigError, match=r"train\.lr .*got nan; must be a finite number"):
        load_config(None, ["train.lr=.nan"])
    with pytest.raises(ConfigError, match=r"train\.epochs .*got 2\.5; expected int \| null"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"mslr\.scales .*got 4; expected list\[float\] \| null"):
        load_config(None, ["mslr.scales=4"])
    with pytest.raises(ConfigError, match=r"data\.attack .*got True; expected str, got bool"):
        load_config(None, ["data.attack=yes"])


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["method=lora_mslr", "mslr.scales=[1,3]", "train.lr=3e-4", "data.max_length=48"])
    as_dict = config_to_dict(cfg)
    assert as_dict["mslr"]["scales"] == [1.0, 3.0] and as_dict["train"]["lr"] == pytest.approx(3e-4)
    path = _write(tmp_path, yaml.safe_dump(as_dict), "saved.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(as_dict) == cfg
    with pytest.raises(ConfigError, match=r"train\.lr \(saved run\): got 0; must be > 0"):
        config_from_dict({**as_dict, "train": {**as_dict["train"], "lr": 0}}, source="saved run")


# ---------------------------------------------------------------------------------------------------
# Per-family defaults


def _resolved(model_type: str, hidden: int, decoder: bool, overrides=()) -> RunConfig:
    return resolve_defaults(load_config(None, overrides), model_type=model_type, hidden_size=hidden,
                            is_decoder=decoder)


@pytest.mark.parametrize(
    ("model_type", "hidden", "targets", "scales"),
    [
        ("bert", 768, ["bert.pooler.dense"], [1, 4, 8, 12, 16, 20, 24, 28]),
        ("bert", 1024, ["bert.pooler.dense"], [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("roberta", 768, ["classifier.dense"], [1, 2, 4, 6, 8, 10, 12, 14, 16]),
        ("roberta", 1024, ["classifier.dense"], [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("bert", 384, ["bert.pooler.dense"], [1, 2, 4, 8, 16]),
    ],
)
def test_resolve_defaults_encoders(model_type, hidden, targets, scales):
    cfg = _resolved(model_type, hidden, False, ["recipe=authors"])
    assert cfg.mslr.targets == targets and cfg.mslr.scales == [float(k) for k in scales]
    assert cfg.lora.target_modules == ["query", "value"]
    assert (cfg.lora.r, cfg.lora.alpha, cfg.mslr.alpha, cfg.mslr.rank) == (8, 32.0, 6.0, 1)
    assert (cfg.align.min_ref_loss, cfg.align.max_raw_ratio, cfg.align.start_epoch) == (0.4, 0.1, 1)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (10, 32, 2e-5)
    assert (cfg.data.max_length, cfg.data.ref_size, cfg.data.setting) == (512, 96, "clean")
    assert all(_get(cfg, k) is not None for k in AUTO_KEYS)


@pytest.mark.parametrize(("model_type", "lora_targets"), [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_resolve_defaults_decoders(model_type, lora_targets):
    cfg = _resolved(model_type, 64, True, ["data.attack=addsent", "recipe=authors"])
    assert cfg.lora.target_modules == lora_targets
    assert cfg.mslr.targets == ["score.dense"] and cfg.mslr.scales == [1.0, 2.0, 3.0, 4.0]
    assert (cfg.lora.r, cfg.lora.alpha, cfg.mslr.alpha) == (2, 8.0, 4.0)
    assert (cfg.align.min_ref_loss, cfg.align.max_raw_ratio, cfg.align.start_epoch) == (0.0, 0.0, 0)
    assert cfg.align.min_ref_grad_norm == 5e-7
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (5, 16, 1e-5)
    assert (cfg.data.max_length, cfg.data.ref_size, cfg.data.setting) == (4096, 128, "mix")


@pytest.mark.parametrize("decoder", [False, True])
def test_musclelora_defaults_to_the_defended_recipe_and_the_authors_are_one_setting_away(decoder):
    model_type, hidden = ("llama", 64) if decoder else ("bert", 384)
    defended = _resolved(model_type, hidden, decoder)
    authors = _resolved(model_type, hidden, decoder, ["recipe=authors"])
    assert defended.recipe == "defended" and authors.recipe == "authors"
    gates = ("min_ref_loss", "min_ref_grad_norm", "max_raw_ratio", "start_epoch")
    assert [getattr(defended.align, k) for k in gates] == [0.0, 0.0, 0.0, 0]
    assert (defended.data.ref_size, defended.filter.method) == (600, "lexical_zscore")
    assert [getattr(authors.align, k) for k in gates] == ([0.0, 5e-7, 0.0, 0] if decoder else [0.4, 5e-7, 0.1, 1])
    assert (authors.data.ref_size, authors.filter.method) == (128 if decoder else 96, "none")
    # the recipe touches only its own keys: everything else is the family's
    same = dataclasses.replace(defended, recipe="authors", data=authors.data, align=authors.align, filter=authors.filter)
    assert same == authors
    # keys the config sets are kept under either recipe
    kept = _resolved(model_type, hidden, decoder, ["data.ref_size=384", "filter.method=none", "align.min_ref_loss=0.4"])
    assert (kept.data.ref_size, kept.filter.method, kept.align.min_ref_loss) == (384, "none", 0.4)
    assert kept.align.max_raw_ratio == 0.0 and kept.align.min_ref_grad_norm == 0.0


@pytest.mark.parametrize("decoder", [False, True])
def test_the_defended_recipe_draws_16_reference_rows_per_step_and_the_authors_the_training_batch(decoder):
    """Issue 11 step 5: recipe=defended's reference batch is 16 rows (capped at the reference set); a set value wins."""
    from pipeline.training import reference_batch_size

    model_type, hidden = ("llama", 64) if decoder else ("bert", 384)
    defended = _resolved(model_type, hidden, decoder)
    authors = _resolved(model_type, hidden, decoder, ["recipe=authors"])
    assert defended.align.ref_batch_size == 16 and reference_batch_size(defended) == 16
    assert authors.align.ref_batch_size is None and reference_batch_size(authors) == authors.train.batch_size
    assert _resolved(model_type, hidden, decoder, ["data.ref_size=10"]).align.ref_batch_size == 10  # capped
    assert _resolved(model_type, hidden, decoder, ["train.batch_size=4"]).align.ref_batch_size == 4  # never above the batch
    assert _resolved(model_type, hidden, decoder, ["align.ref_batch_size=32"]).align.ref_batch_size == 32  # kept
    assert _resolved(model_type, hidden, decoder, ["method=ga_lora"]).align.ref_batch_size is None  # other methods
    assert resolve_defaults(defended, model_type=model_type, hidden_size=hidden, is_decoder=decoder) == defended


@pytest.mark.parametrize("method", ["ga", "ga_lora", "lora_mslr", "ref_only", "vanilla", "lora"])
def test_the_recipe_leaves_every_other_method_at_the_authors_values(method):
    other = _resolved("bert", 384, False, [f"method={method}"])
    authors = _resolved("bert", 384, False, [f"method={method}", "recipe=authors"])
    assert dataclasses.replace(other, recipe="authors") == authors
    assert (other.data.ref_size, other.filter.method, other.align.min_ref_grad_norm) == (96, "none", 5e-7)


def test_full_finetuning_lr_is_the_one_chosen_for_minilm_and_the_authors_elsewhere():
    """MiniLM-size BERT (hidden 384): vanilla/ga's auto lr is 2e-4 (chosen on dev-clean, issue 11 step 3); BERT-base,
    RoBERTa and decoders keep the authors' values; the adapters' lr and set values are untouched."""
    minilm = _resolved("bert", 384, False, ["method=vanilla", "train.lr_adapters=1e-3"])
    assert minilm.train.lr_full_finetune == pytest.approx(2e-4) and minilm.train.lr == pytest.approx(2e-4)
    assert _resolved("bert", 384, False, ["method=ga"]).train.lr == pytest.approx(2e-4)
    assert _resolved("bert", 384, False, ["method=lora", "train.lr_adapters=1e-3"]).train.lr == pytest.approx(1e-3)
    assert _resolved("bert", 768, False, ["method=vanilla"]).train.lr == pytest.approx(2e-5)
    assert _resolved("roberta", 384, False, ["method=vanilla"]).train.lr == pytest.approx(2e-5)
    assert _resolved("llama", 384, True, ["method=vanilla"]).train.lr == pytest.approx(1e-5)
    assert _resolved("bert", 384, False, ["method=vanilla", "train.lr_full_finetune=3e-5"]).train.lr == pytest.approx(3e-5)
    assert _resolved("bert", 384, False, ["method=vanilla", "train.lr=2e-5"]).train.lr == pytest.approx(2e-5)


def test_align_raw_share_defaults_to_the_pure_projection_and_is_bounded():
    assert load_config(None, []).align.raw_share == 0.0
    assert load_config(None, ["align.raw_share=0.05"]).align.raw_share == pytest.approx(0.05)
    for bad in ("1", "-0.1"):
        with pytest.raises(ConfigError, match=rf"align.raw_share.*got {bad}.*Fix: use a share in \[0, 1\)"):
            load_config(None, [f"align.raw_share={bad}"])


def test_resolve_defaults_keeps_set_values_and_is_idempotent():
    cfg = _resolved("bert", 768, False, ["train.lr=2e-4", "mslr.scales=[1,2]", "data.setting=mix", "lora.r=4"])
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.mslr.scales == [1.0, 2.0]
    assert cfg.data.setting == "mix" and cfg.lora.r == 4 and cfg.lora.alpha == 32.0
    assert resolve_defaults(cfg, model_type="bert", hidden_size=768, is_decoder=False) == cfg


def test_resolve_defaults_unknown_family_names_the_keys_to_set():
    with pytest.raises(ConfigError) as info:
        _resolved("distilbert", 768, False)
    problems = info.value.problems
    assert len(problems) == 3
    assert re.match(r"lora\.target_modules: no default for model type 'distilbert'.*Fix: set lora\.target_modules",
                    problems[0])
    assert re.match(r"mslr\.targets: no default .*Fix: set mslr\.targets", problems[1])
    assert re.match(r"mslr\.scales: no default for model type 'distilbert' with hidden size 768.*"
                    r"Fix: set mslr\.scales", problems[2])
    with pytest.raises(ConfigError, match=r"^invalid run configuration \(1 problem\):\n  - mslr\.scales: no default "
                                          r"for model type 'bert' with hidden size 512"):
        _resolved("bert", 512, False)
    explicit = _resolved("distilbert", 768, False, ["lora.target_modules=[q_lin,v_lin]",
                                                    "mslr.targets=[pre_classifier]", "mslr.scales=[1,2]"])
    assert explicit.lora.target_modules == ["q_lin", "v_lin"] and explicit.mslr.targets == ["pre_classifier"]
    vanilla = _resolved("distilbert", 768, False, ["method=vanilla"])
    assert vanilla.lora.target_modules is None and vanilla.mslr.scales is None and vanilla.train.lr == 2e-5
    lora_only = _resolved("distilbert", 768, False, ["method=ga_lora", "lora.target_modules=[q_lin]"])
    assert lora_only.mslr.targets is None


def test_resolve_defaults_rejects_bad_model_description():
    with pytest.raises(ConfigError, match=r"hidden_size: got 0; must be a positive int"):
        resolve_defaults(RunConfig(), model_type="bert", hidden_size=0, is_decoder=False)
    with pytest.raises(ConfigError, match=r"model_type: got ''; must be a non-empty string"):
        resolve_defaults(RunConfig(), model_type="", hidden_size=8, is_decoder=False)


# ---------------------------------------------------------------------------------------------------
# Help listing and method helpers


def test_describe_keys_covers_every_field():
    rows = describe_keys()
    assert [r[0] for r in rows if "." not in r[0]] == ["method", "recipe", "seed", "output_dir", "resume", "overwrite"]
    assert {r[0] for r in rows} == _all_keys() and len(rows) == len(_all_keys())
    by_key = {key: (type_name, default, help_text) for key, type_name, default, help_text in rows}
    assert all(help_text for _, _, help_text in by_key.values())
    assert {k for k, (type_name, default, _) in by_key.items() if default == "auto" and "null" in type_name} == AUTO_KEYS
    assert by_key["train.lr"][0] == "float | null" and by_key["mslr.scales"][0] == "list[float] | null"
    assert by_key["train.device"][:2] == ("auto|cpu|cuda", "auto")
    assert by_key["resume"][:2] == ("bool", "false") and by_key["data.max_train_samples"][1] == "null"
    assert by_key["align.min_ref_grad_norm"][1] == "auto" and by_key["recipe"][:2] == ("defended|authors", "defended") and by_key["data.poison_rate"][:2] == ("str", "0.1")


def test_method_helpers():
    table = {
        "vanilla": (False, False, False),
        "ga": (False, False, True),
        "lora": (True, False, False),
        "lora_mslr": (True, True, False),
        "ga_lora": (True, False, True),
        "musclelora": (True, True, True),
        "ref_only": (True, True, False),
        "adapter": (False, False, False),
        "prompt": (False, False, False),
        "prefix": (False, False, False),
    }
    assert set(table) == set(typing.get_args(typing.get_type_hints(RunConfig)["method"]))
    for method, expected in table.items():
        assert (uses_lora(method), uses_mslr(method), uses_alignment(method)) == expected
    with pytest.raises(ConfigError, match=r"method: got 'musclora'.*did you mean 'musclelora'"):
        uses_lora("musclora")


# ---------------------------------------------------------------------------------------------------
# Shipped YAML configs


@pytest.mark.parametrize("name", ["demo.yaml", "sst2_minilm.yaml", "bert_base.yaml", "roberta_base.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIG_DIR / name)
    assert cfg.method == "musclelora" and cfg.data.dataset == "sst-2" and cfg.data.attack == "badnets"


def test_demo_and_minilm_configs():
    demo = load_config(CONFIG_DIR / "demo.yaml")
    assert demo.model.name_or_path == "minilm" and demo.output_dir == "runs/demo"
    assert (demo.data.max_length, demo.train.epochs, demo.train.batch_size) == (64, 2, 32)
    assert demo.data.max_train_samples == 3000
    # train.lr stays auto: the adapter methods take lr_adapters 1e-3, vanilla / ga MiniLM's 2e-4 (lr_full_finetune auto).
    assert demo.train.lr is None and demo.train.lr_adapters == pytest.approx(1e-3) and demo.mslr.init == "zero"
    assert demo.train.lr_full_finetune is None
    full = load_config(CONFIG_DIR / "sst2_minilm.yaml")
    assert (full.data.max_length, full.train.epochs, full.train.lr_adapters) == (128, 10, pytest.approx(1e-3))
    assert full.mslr.scales == _resolved("bert", 384, False).mslr.scales


@pytest.mark.parametrize(("name", "model_type"), [("bert_base.yaml", "bert"), ("roberta_base.yaml", "roberta")])
def test_authors_configs_match_the_automatic_defaults(name, model_type):
    cfg = load_config(CONFIG_DIR / name)
    assert cfg.model.name_or_path.startswith("/path/to/")
    auto = _resolved(model_type, 768, False, ["recipe=authors"])
    # The bottleneck baseline and the canary are not part of the authors' recipe; train.lr set in the file
    # applies to every method, so the per-family lrs do not matter there.
    for key in sorted(AUTO_KEYS - {"adapter.targets", "canary.target_label", "train.lr_full_finetune", "train.lr_adapters"}):
        assert _get(cfg, key) == _get(auto, key), key
    assert resolve_defaults(cfg, model_type=model_type, hidden_size=768, is_decoder=False).train == auto.train


@pytest.mark.parametrize(("name", "model_type"), [("llama2_7b_bf16.yaml", "llama"), ("mistral_7b_bf16.yaml", "mistral"), ("gpt2_xl_bf16.yaml", "gpt2")])
def test_llm_recipes_are_the_authors_decoder_defaults(name, model_type):
    cfg = load_config(CONFIG_DIR / name)
    assert cfg.model.name_or_path.startswith("/path/to/") and cfg.model.dtype == "bfloat16"
    auto = resolve_defaults(load_config(None, ["model.name_or_path=/x", "model.dtype=bfloat16", "recipe=authors"]), model_type=model_type,
                            hidden_size=4096, is_decoder=True)
    resolved = resolve_defaults(cfg, model_type=model_type, hidden_size=4096, is_decoder=True)
    for section in ("lora", "mslr", "align"):
        assert getattr(resolved, section) == getattr(auto, section), section
    assert (resolved.train.epochs, resolved.train.batch_size, resolved.train.lr) == (5, 16, 1e-5)


@pytest.mark.parametrize("model", ["llama2_7b", "mistral_7b", "gpt2_xl"])
def test_nf4_recipes_are_the_bf16_recipes_over_a_4bit_base(model):
    import dataclasses

    bf16 = load_config(CONFIG_DIR / f"{model}_bf16.yaml")
    nf4 = load_config(CONFIG_DIR / f"{model}_nf4.yaml")
    q = nf4.model
    assert (q.quantization, q.double_quant, q.quant_storage, q.prepare_kbit, q.gradient_checkpointing) == (
        "nf4", True, "auto", True, True)
    assert dataclasses.replace(q, quantization="none", gradient_checkpointing=False) == bf16.model
    for section in ("data", "lora", "mslr", "align", "train"):
        assert getattr(nf4, section) == getattr(bf16, section), section
    assert nf4.method == bf16.method == "musclelora" and nf4.output_dir != bf16.output_dir
