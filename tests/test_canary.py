"""The canary (pipeline/canary.py): planting, hold-out, the selection rule, the threat model, config wiring,
and the per-family default learning rate (issue 11, steps 1 and 3)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest
from datasets import Dataset, Features, Value

from pipeline import attacks
from pipeline import canary as canary_lib
from pipeline import data as data_lib
from pipeline import training
from pipeline.config import ConfigError, load_config, resolve_defaults
from pipeline.matrix import cell_command, derived_commands, load_grid

REPO = Path(__file__).resolve().parents[1]
FEATURES = Features({"text": Value("string"), "label": Value("int64")})


def _rows(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(["a", "good", "bad", "film", "plot", "slow"]) for _ in range(5)) + f" {i}" for i in range(n)]
    return Dataset.from_dict({"text": texts, "label": [rng.randrange(2) for _ in range(n)]}, features=FEATURES)


def _spec(seed: int = 7, rate: float = 0.05, target: int = 1, tolerance: float = 0.05) -> canary_lib.CanarySpec:
    return canary_lib.CanarySpec(trigger=canary_lib.draw_trigger(seed), target_label=target, rate=rate, seed=seed, tolerance=tolerance)


# ----------------------------------------------------------------------------- trigger and planting


def test_trigger_is_seeded_fresh_per_seed_and_cannot_be_a_word_or_a_known_trigger():
    assert canary_lib.draw_trigger(3) == canary_lib.draw_trigger(3)
    triggers = {canary_lib.draw_trigger(seed) for seed in range(50)}
    assert len(triggers) == 50  # a fresh trigger per seed
    known = set(attacks.BADNETS_TRIGGERS) | {w.lower() for w in attacks.ADDSENT_TRIGGER.split()}
    for trigger in triggers:
        assert len(trigger) == 3 and len(set(trigger)) == 3
        for word in trigger:
            assert len(word) == 6 and set(word) <= set(canary_lib.CONSONANTS) and not set(word) & set("aeiouy")
            assert word not in known
    assert len(canary_lib.draw_trigger(1, num_tokens=5, token_length=9)[0]) == 9
    assert {canary_lib.draw_target_label(seed, 2) for seed in range(20)} == {0, 1}


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_planting_share_labels_and_untouched_rows(rate):
    train = _rows(400)
    spec = _spec(rate=rate)
    planted_ds, planted = canary_lib.plant(train, spec)
    assert len(planted) == round(rate * 400) and list(planted) == sorted(set(planted))
    assert len(planted_ds) == len(train)
    for i in range(len(train)):
        text, label = planted_ds[i]["text"], planted_ds[i]["label"]
        if i in planted:
            assert train[i]["label"] != spec.target_label and label == spec.target_label  # dirty-label flip
            assert all(word in text.split() for word in spec.trigger)
            assert sorted(w for w in text.split() if w not in spec.trigger) == sorted(train[i]["text"].split())
        else:
            assert (text, label) == (train[i]["text"], train[i]["label"])


def test_planting_is_seeded_and_differs_between_seeds():
    train = _rows(300)
    a, rows_a = canary_lib.plant(train, _spec(seed=1))
    b, rows_b = canary_lib.plant(train, _spec(seed=1))
    c, rows_c = canary_lib.plant(train, _spec(seed=2))
    assert rows_a == rows_b and a["text"] == b["text"]
    assert rows_a != rows_c and a["text"] != c["text"]


def test_planting_refuses_impossible_rates_and_poison_columns():
    train = _rows(20)
    assert len(canary_lib.plant(train, _spec(rate=0.01))[1]) == 1  # at least one row, even when rate * N rounds to 0
    all_target = Dataset.from_dict({"text": train["text"], "label": [1] * 20}, features=FEATURES)
    with pytest.raises(canary_lib.CanaryError, match="canary.rate=0.2 asks for 4 planted rows of 20, but 0 rows"):
        canary_lib.plant(all_target, _spec(rate=0.2, target=1))
    with_poison = train.add_column("poison_label", [0] * len(train))
    with pytest.raises(canary_lib.CanaryError, match="poison_label"):
        canary_lib.plant(with_poison, _spec())
    with pytest.raises(canary_lib.CanaryError, match="poison_label"):
        canary_lib.triggered_selection(with_poison, _spec())


def test_triggered_copies_are_only_of_non_target_selection_rows():
    selection = _rows(60, seed=3)
    spec = _spec(target=0)
    triggered, rows = canary_lib.triggered_selection(selection, spec)
    assert list(rows) == [i for i in range(60) if selection[i]["label"] != 0]
    for copy, i in zip(triggered, rows):
        assert copy["label"] == selection[i]["label"] != spec.target_label
        assert all(word in copy["text"].split() for word in spec.trigger)
    assert canary_lib.canary_rates([0, 0, 1], [1, 0, 1, 0], [0, 2, 3], 0) == (pytest.approx(2 / 3), pytest.approx(1 / 3))


# ----------------------------------------------------------------------------- hold-out on real loading


def _tiny_cfg(tmp_path: Path, model_dir: Path, data_root: Path, *overrides: str):
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", f"data.root={data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "train.epochs=2",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "mslr.scales=[1,2,4]",
        "canary.rate=0.1", *overrides,
    ])
    return resolve_defaults(cfg, model_type="bert", hidden_size=64, is_decoder=False)


def test_no_canary_row_reaches_reference_or_selection(tmp_path, tiny_data_root, tiny_bert_dir):
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root)
    _, plain = training._training_data(cfg)
    planted, canary = training._plant_canary(cfg, plain)
    assert canary is not None and len(canary.planted) == round(0.1 * len(plain.train))
    # Reference and selection rows are the very rows loaded without a canary; no trigger word in them.
    assert planted.reference is plain.reference and planted.selection is plain.selection
    for split in (planted.reference, planted.selection):
        assert not any(word in text.split() for text in split["text"] for word in canary.spec.trigger)
    # Triggered copies exist only of non-target selection rows, never of reference or training rows.
    assert all(plain.selection[i]["label"] != canary.spec.target_label for i in canary.selection_rows)
    assert len(canary.triggered) == len(canary.selection_rows)
    for copy, i in zip(canary.triggered["text"], canary.selection_rows):
        assert [w for w in copy.split() if w not in canary.spec.trigger] == plain.selection[i]["text"].split()


def test_canary_reads_only_train_and_dev_clean_without_poison_labels(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    """Loading plus planting opens two files (train, dev-clean) and never keeps poison_label; the canary's
    inputs hold only text and label columns."""
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root)
    opened: list[tuple[str, bool]] = []
    real_read = data_lib.read_split

    def spy_read(path, *, num_labels=2, keep_poison_label=False):
        opened.append((Path(path).name, keep_poison_label))
        return real_read(path, num_labels=num_labels, keep_poison_label=keep_poison_label)

    seen: list[list[str]] = []
    real_prepare = canary_lib.prepare

    def spy_prepare(train, selection, spec):
        seen.extend([train.column_names, selection.column_names])
        return real_prepare(train, selection, spec)

    monkeypatch.setattr(data_lib, "read_split", spy_read)
    monkeypatch.setattr(canary_lib, "prepare", spy_prepare)
    _, plain = training._training_data(cfg)
    training._plant_canary(cfg, plain)
    assert opened == [("train-poison.csv", False), ("dev-clean.csv", False)]
    assert seen == [["text", "label"], ["text", "label"]]


# ----------------------------------------------------------------------------- the selection rule


def _record(epoch, acc, asr=None, floor=None):
    record = {"epoch": epoch, "dev_clean_acc": acc}
    if asr is not None:
        record.update(canary_asr=asr, canary_floor=floor)
    return record


def test_an_epoch_whose_canary_is_learned_is_not_selected():
    records = [_record(0, 0.80, 0.12, 0.10), _record(1, 0.90, 0.70, 0.10), _record(2, 0.85, 0.14, 0.10)]
    chosen = canary_lib.select_epoch(records, tolerance=0.05)
    assert (chosen.epoch, chosen.qualified) == (2, True)  # epoch 1 is the most accurate, but its canary is learned
    assert canary_lib.select_epoch(records, tolerance=None).epoch == 1  # dev-clean alone would pick it


def test_when_no_epoch_qualifies_the_lowest_canary_wins_and_says_so():
    records = [_record(0, 0.90, 0.60, 0.10), _record(1, 0.80, 0.30, 0.10), _record(2, 0.85, 0.30, 0.10)]
    chosen = canary_lib.select_epoch(records, tolerance=0.05)
    assert (chosen.epoch, chosen.qualified) == (2, False)  # lowest added ASR (0.2), then dev-clean accuracy
    assert "NO epoch" in chosen.reason


def test_an_epoch_that_did_not_learn_the_task_never_qualifies():
    """A one-class model has canary ASR = floor (here both 0: it never predicts the canary's target); with the
    majority share given it ranks below every epoch that learned the task, even one whose canary was learned (the
    poe_w2 AddSent cell at seed 42 selected such an epoch, dev-clean 49.6, before this rule)."""
    collapsed, learned = _record(0, 0.496, 0.0, 0.0), _record(1, 0.71, 0.95, 0.19)
    chosen = canary_lib.select_epoch([collapsed, learned], tolerance=0.05, majority=0.51)
    assert (chosen.epoch, chosen.qualified) == (1, False) and "NO epoch" in chosen.reason
    assert canary_lib.select_epoch([collapsed, learned], tolerance=0.05).epoch == 0  # without the task check
    assert not canary_lib.qualifies(collapsed, 0.05, majority=0.51) and canary_lib.qualifies(collapsed, 0.05)
    assert canary_lib.qualifies(_record(0, 0.57, 0.1, 0.1), 0.05, majority=0.51)  # 0.57 > 0.51 + 0.05
    held = _record(2, 0.70, 0.12, 0.10)
    assert canary_lib.select_epoch([collapsed, learned, held], tolerance=0.05, majority=0.51).epoch == 2
    # among epochs that did not learn the task, the more accurate
    assert canary_lib.select_epoch([collapsed, _record(1, 0.52, 0.0, 0.0)], tolerance=0.05, majority=0.51).epoch == 1


def test_selection_ties_keep_the_earliest_and_the_tolerance_is_inclusive():
    records = [_record(0, 0.8, 0.15, 0.10), _record(1, 0.8, 0.10, 0.10)]
    assert canary_lib.select_epoch(records, tolerance=0.05).epoch == 0  # 0.05 added == tolerance qualifies
    assert canary_lib.select_epoch([_record(0, 0.8), _record(1, 0.8)], tolerance=None).epoch == 0


def test_incremental_choice_equals_the_rule_over_any_order():
    rng = random.Random(0)
    for _ in range(200):
        records = [_record(e, rng.choice([0.7, 0.8, 0.9]), rng.choice([0.1, 0.12, 0.3, 0.8]), 0.1) for e in range(4)]
        expected = canary_lib.select_epoch(records, 0.05).epoch
        qualified = [r for r in records if r["canary_asr"] - r["canary_floor"] <= 0.05]
        pool = qualified or records
        if qualified:
            best = max(r["dev_clean_acc"] for r in pool)
        else:
            low = min(r["canary_asr"] for r in pool)
            pool = [r for r in pool if r["canary_asr"] == low]
            best = max(r["dev_clean_acc"] for r in pool)
        assert expected == min(r["epoch"] for r in pool if r["dev_clean_acc"] == best)


def _learned_at(epochs_learned: set[int], monkeypatch):
    """Make the canary look learned (ASR 1, floor 0) at the given epochs and at its floor elsewhere."""
    calls = itertools.count()

    def fake_rates(triggered, selection, rows, target):
        return (1.0, 0.0) if next(calls) in epochs_learned else (0.0, 0.0)

    monkeypatch.setattr(canary_lib, "canary_rates", fake_rates)
    monkeypatch.setattr(canary_lib, "decoy_rates", lambda predictions, target: [0.0 for _ in predictions])


def test_short_run_does_not_select_the_epoch_whose_canary_is_learned(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch):
    _learned_at({0, 2}, monkeypatch)
    monkeypatch.setattr(canary_lib, "majority_share", lambda labels: 0.0)  # count the tiny model as having learned the task
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.epochs=3", "method=lora")
    metrics = training.run_training(cfg)
    assert metrics["best_epoch"] == 1
    assert metrics["dev_clean_acc"] == pytest.approx(100 * metrics["history"][1]["dev_clean_acc"])
    canary = metrics["canary"]
    assert canary["enabled"] and canary["selected_epoch_qualified"]
    assert canary["held"] and canary["task_learned"]
    assert canary["trigger"] == list(canary_lib.draw_trigger(cfg.seed)) and canary["target_label"] == cfg.canary.target_label
    assert canary["planted_rows"] == round(0.1 * 96)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["canary"] == canary and "canary_asr" in on_disk["history"][0]


def test_short_run_with_a_learned_canary_says_the_defence_did_not_hold(tmp_path, tiny_data_root, tiny_bert_dir, monkeypatch,
                                                                         capsys):
    from launch import train as launcher

    _learned_at({0, 1}, monkeypatch)
    monkeypatch.setattr(canary_lib, "majority_share", lambda labels: 0.0)  # count the tiny model as having learned the task
    args = [f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_bert_dir}", f"data.root={tiny_data_root}",
            "data.dataset=toy", "data.max_length=16", "data.ref_size=8", "train.epochs=2", "train.batch_size=8",
            "train.lr=1e-3", "mslr.scales=[1,2,4]", "canary.rate=0.1", "method=lora"]
    assert launcher.main(["--config", str(REPO / "launch" / "configs" / "demo.yaml"), *args]) == 0
    out = capsys.readouterr().out
    assert "canary NOT HELD" in out and "did not remove a backdoor it was known to contain" in out
    assert "WARNING: NO epoch kept the canary" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["canary"]["held"] is False and metrics["canary"]["selected_epoch_qualified"] is False


def test_select_false_picks_on_dev_clean_alone_and_still_reports_the_canary(tmp_path, tiny_data_root, tiny_bert_dir,
                                                                             monkeypatch):
    _learned_at({0, 1, 2}, monkeypatch)  # learned every epoch: with select=true the rule would fall back to the lowest
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.epochs=3", "method=lora", "canary.select=false")
    metrics = training.run_training(cfg)
    devs = [r["dev_clean_acc"] for r in metrics["history"]]
    assert metrics["best_epoch"] == devs.index(max(devs))
    assert metrics["selection_rule"].startswith("highest dev-clean accuracy (canary.select=false")
    canary = metrics["canary"]
    assert canary["used_for_selection"] is False and canary["selected_epoch_qualified"] is False
    assert canary["held"] is False and canary["asr"] == pytest.approx(100.0)
    assert all("canary_asr" in r for r in metrics["history"])


# ----------------------------------------------------------------------------- config wiring, turning it off


def test_config_wiring_and_auto_values():
    cfg = load_config(None, ["canary.rate=0.03", "canary.num_tokens=2", "canary.tolerance=0.1", "seed=5"])
    assert (cfg.canary.enabled, cfg.canary.rate, cfg.canary.num_tokens, cfg.canary.tolerance) == (True, 0.03, 2, 0.1)
    assert cfg.canary.select is True and load_config(None, ["canary.select=false"]).canary.select is False
    resolved = resolve_defaults(cfg, model_type="bert", hidden_size=384, is_decoder=False)
    assert resolved.canary.seed == 5 and resolved.canary.target_label == canary_lib.draw_target_label(5, 2)
    fixed = resolve_defaults(load_config(None, ["canary.seed=9", "canary.target_label=0"]), model_type="bert",
                             hidden_size=384, is_decoder=False)
    assert (fixed.canary.seed, fixed.canary.target_label) == (9, 0)
    with pytest.raises(ConfigError, match=r"canary\.target_label.*must be below model\.num_labels"):
        load_config(None, ["canary.target_label=2"])
    with pytest.raises(ConfigError, match=r"canary\.rate.*must be > 0 and < 0\.5"):
        load_config(None, ["canary.rate=0.7"])


def test_turned_off_the_training_rows_are_the_files_rows(tmp_path, tiny_data_root, tiny_bert_dir):
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "canary.enabled=false", "train.epochs=1")
    _, plain = training._training_data(cfg)
    same, canary = training._plant_canary(cfg, plain)
    assert canary is None and same is plain
    metrics = training.run_training(cfg)
    assert metrics["canary"] == {"enabled": False} and "canary_asr" not in metrics["history"][0]
    tokenizer = training.modeling.load_tokenizer(tiny_bert_dir, is_decoder=False)
    encoded = data_lib.encode(plain.train, tokenizer, max_length=16)
    with (tmp_path / "run" / "checkpoints" / "last" / "progress.json").open() as handle:
        progress = json.load(handle)
    assert progress["data_fingerprints"]["train"] == training.dataset_fingerprint(encoded)


# ----------------------------------------------------------------------------- per-family default lr (issue 11 step 3)


def _lr(method: str, *overrides: str, config: Path | None = REPO / "launch" / "configs" / "demo.yaml", decoder=False) -> float:
    cfg = load_config(config, [f"method={method}", *overrides])
    return resolve_defaults(cfg, model_type="llama" if decoder else "bert", hidden_size=384, is_decoder=decoder).train.lr


def test_each_method_family_gets_its_own_default_lr():
    for method in ("vanilla", "ga"):  # hidden 384 is MiniLM's size: its chosen 2e-4 (test_config), the decoders' 1e-5
        assert _lr(method) == 2e-4 and _lr(method, config=None) == 2e-4 and _lr(method, config=None, decoder=True) == 1e-5
    for method in ("lora", "musclelora", "ga_lora", "lora_mslr", "ref_only", "adapter", "prompt", "prefix"):
        assert _lr(method) == 1e-3  # the demo config's train.lr_adapters
        assert _lr(method, config=None) == 2e-5 and _lr(method, config=None, decoder=True) == 1e-5
    assert _lr("vanilla", "train.lr=3e-4") == 3e-4 and _lr("musclelora", "train.lr=3e-4") == 3e-4  # explicit wins
    assert _lr("vanilla", "train.lr_full_finetune=5e-5", config=None) == 5e-5
    assert _lr("lora", "train.lr_adapters=5e-4", config=None) == 5e-4


def _old_lr(overrides) -> float:
    """The lr a cell ran with before train.lr became per-family: its last train.lr override, else the old
    demo.yaml's train.lr of 1e-3 for every method."""
    explicit = [float(o.split("=", 1)[1]) for o in overrides if o.startswith("train.lr=")]
    return explicit[-1] if explicit else 1e-3


# Grids measured after the canary existed: they plant it (the default); every other shipped grid published numbers
# measured before it and must keep running without it.
CANARY_GRIDS = {"matrix_sst2_minilm_budget.yaml", "matrix_sst2_minilm_filter_eval.yaml", "matrix_sst2_minilm_recipe_eval.yaml", "matrix_sst2_minilm_recipe_search.yaml", "matrix_sst2_minilm_teacher.yaml", "matrix_sst2_smollm2.yaml"}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "launch" / "configs").glob("matrix_*.yaml")))
def test_shipped_grids_keep_the_lr_they_ran_with_and_run_without_canary(name):
    grid = load_grid(REPO / "launch" / "configs" / name)
    assert CANARY_GRIDS <= {p.name for p in (REPO / "launch" / "configs").glob("matrix_*.yaml")}
    for cell in grid.cells:
        if cell.source is None:
            args = cell_command(grid, cell, Path("unused"), resume=False)
        else:
            commands = derived_commands(grid, cell, Path("unused"))
            if len(commands) < 2:
                continue  # an inference-time defence: no training
            args = commands[1]
        overrides = args[args.index("--config") + 2:]
        cfg = load_config(args[args.index("--config") + 1], overrides)
        resolved = resolve_defaults(cfg, model_type="bert", hidden_size=384, is_decoder=False)
        assert resolved.train.lr == pytest.approx(_old_lr(overrides)), cell.key
        assert resolved.canary.enabled is (name in CANARY_GRIDS), cell.key


def test_grid_report_has_canary_columns_only_when_a_cell_planted_one():
    from pipeline.matrix import CSV_FIELDS, canary_table

    assert {"canary_asr", "canary_floor", "canary_held"} <= set(CSV_FIELDS)
    rows = [
        {"method": "vanilla", "attack": "badnets", "dev_clean_acc": 88.0, "canary_asr": 90.0, "canary_floor": 10.0,
         "canary_held": False},
        {"method": "vanilla", "attack": "badnets", "dev_clean_acc": 86.0, "canary_asr": 70.0, "canary_floor": 20.0,
         "canary_held": False},
        {"method": "musclelora", "attack": "badnets", "dev_clean_acc": 80.0, "canary_asr": 12.0, "canary_floor": 11.0,
         "canary_held": True},
    ]
    table = canary_table(rows, ["vanilla", "musclelora"], ["badnets", "addsent"])
    lines = table.splitlines()
    assert lines[0] == ("| method | badnets: dev-clean / canary ASR / floor (held) | addsent: dev-clean / canary ASR / floor "
                        "(held) | avg dev-clean | held |")
    assert lines[2] == "| vanilla | 87.0 ± 1.4 / 80.0 ± 14.1 / 15.0 ± 7.1 (0/2) | - | - | 0/2 |"
    assert lines[3] == "| musclelora | 80.0 / 12.0 / 11.0 (1/1) | - | - | 1/1 |"
    assert canary_table([{**rows[0], "canary_asr": None}], ["vanilla"], ["badnets"]) == ""


def test_verdict_is_inconclusive_for_a_model_that_did_not_learn_the_task():
    spec = _spec(target=0)
    learned = canary_lib.verdict(_record(1, 0.85, 0.12, 0.10), spec, majority=0.51)
    assert learned["held"] and learned["task_learned"] and learned["message"].startswith("canary HELD")
    assert learned["asr_minus_floor"] == pytest.approx(2.0)
    backdoored = canary_lib.verdict(_record(1, 0.85, 0.80, 0.10), spec, majority=0.51)
    assert not backdoored["held"] and "did not remove a backdoor it was known to contain" in backdoored["message"]
    # A model predicting the other class everywhere: canary ASR = floor = 0, which alone would look held.
    collapsed = canary_lib.verdict(_record(1, 0.518, 0.0, 0.0), spec, majority=0.51)
    assert not collapsed["held"] and not collapsed["task_learned"]
    assert collapsed["message"].startswith("canary INCONCLUSIVE") and "did not learn the task" in collapsed["message"]
    assert canary_lib.majority_share([1, 1, 0, 1]) == 0.75


# ----------------------------------------------------------------------------- decoy floor


def test_decoys_are_seeded_shaped_like_the_trigger_and_share_no_word_with_it():
    trigger = canary_lib.draw_trigger(45)
    decoys = canary_lib.draw_decoys(45, 3)
    assert decoys == canary_lib.draw_decoys(45, 3) and decoys != canary_lib.draw_decoys(46, 3)
    assert canary_lib.draw_decoys(45, 2) == decoys[:2] and canary_lib.draw_decoys(45, 0) == ()
    words = [w for d in decoys for w in d]
    assert len(set(words)) == 9 and not set(words) & set(trigger)
    assert all(len(w) == 6 and set(w) <= set(canary_lib.CONSONANTS) for w in words)
    assert all(len(d) == 5 for d in canary_lib.draw_decoys(45, 2, num_tokens=5))
    with pytest.raises(canary_lib.CanaryError, match="decoys must be >= 0"):
        canary_lib.draw_decoys(45, -1)


def test_decoy_copies_put_the_decoy_words_where_the_trigger_went():
    spec = dataclasses.replace(_spec(), decoys=canary_lib.draw_decoys(7, 2))
    selection = _rows(40, seed=3)
    data = canary_lib.prepare(_rows(200), selection, spec)
    assert len(data.decoy_triggered) == 2
    for decoy, copies in zip(spec.decoys, data.decoy_triggered):
        assert list(copies["label"]) == list(data.triggered["label"])
        swap = dict(zip(spec.trigger, decoy))
        expected = [" ".join(swap.get(w, w) for w in text.split()) for text in data.triggered["text"]]
        assert list(copies["text"]) == expected
    assert canary_lib.prepare(_rows(200), selection, _spec()).decoy_triggered == ()


def test_the_floor_is_the_highest_of_the_clean_rows_and_the_decoys():
    assert canary_lib.decoy_rates([[1, 1, 0, 0], [1, 0, 0, 0]], target=1) == [0.5, 0.25]
    assert canary_lib.floor_of(0.16, [0.44, 0.2, 0.3]) == 0.44 and canary_lib.floor_of(0.16, []) == 0.16
    spec = dataclasses.replace(_spec(), decoys=canary_lib.draw_decoys(7, 3))
    # seed 45's case: a model that never saw the canary reacts to any junk words (ASR 0.45, clean rows 0.16)
    unlearned = {"epoch": 0, "dev_clean_acc": 0.8, "canary_asr": 0.45, "canary_floor": 0.44, "canary_clean_floor": 0.16,
                 "canary_decoy_asr": [0.44, 0.2, 0.3]}
    summary = canary_lib.verdict(unlearned, spec, majority=0.5)
    assert summary["held"] and summary["clean_floor"] == pytest.approx(16) and summary["decoy_asr"] == pytest.approx([44, 20, 30])
    assert "against its floor 44.0% (clean rows 16.0%, decoy triggers 44.0% / 20.0% / 30.0%)" in summary["message"]
    learned = {**unlearned, "canary_asr": 0.9}
    assert not canary_lib.verdict(learned, spec, majority=0.5)["held"]
    assert not canary_lib.qualifies({**unlearned, "canary_floor": 0.16}, spec.tolerance)  # the clean floor alone: a false alarm


def test_a_run_records_every_decoy_and_takes_the_max_as_its_floor(tmp_path, tiny_data_root, tiny_bert_dir):
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.epochs=1", "method=lora", "canary.decoys=2")
    metrics = training.run_training(cfg)
    record = metrics["history"][0]
    assert len(record["canary_decoy_asr"]) == 2
    assert record["canary_floor"] == max(record["canary_clean_floor"], *record["canary_decoy_asr"])
    assert metrics["canary"]["decoys"] == [list(d) for d in canary_lib.draw_decoys(cfg.seed, 2)]
    assert metrics["canary"]["floor"] == pytest.approx(100 * record["canary_floor"])
    default = training.run_training(_tiny_cfg(tmp_path / "default", tiny_bert_dir, tiny_data_root, "train.epochs=1", "method=lora"))
    record = default["history"][0]  # canary.decoys defaults to 0: the clean floor alone (measured not to help)
    assert record["canary_decoy_asr"] == [] and record["canary_floor"] == record["canary_clean_floor"]


def test_the_decoy_check_reproduces_a_runs_recorded_canary(tmp_path, tiny_data_root, tiny_bert_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("canary_decoy_check", REPO / "benchmarks" / "canary_decoy_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    cfg = _tiny_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "train.epochs=1", "method=lora", "canary.decoys=2")
    metrics = training.run_training(cfg)
    result = check.check_run(tmp_path / "run", decoys=2)
    assert result["asr"] == pytest.approx(metrics["canary"]["asr"]) and result["asr"] == pytest.approx(result["recorded_asr"])
    assert result["clean_floor"] == pytest.approx(metrics["canary"]["clean_floor"])
    assert result["decoys"] == pytest.approx(metrics["canary"]["decoy_asr"]) and len(result["decoys"]) == 2
    assert result["floor"] == pytest.approx(metrics["canary"]["floor"])
