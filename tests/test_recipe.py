"""The defended recipe as musclelora's default (issue 11 step 4) and the trusted-rows comparator
(data.train_on_reference): what a run resolves, trains on and prints."""

from __future__ import annotations

import json
import math

import pytest

from pipeline import training
from pipeline.config import ConfigError, load_config, resolve_defaults


def _args(tmp_path, model_dir, data_root, *overrides) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", f"data.root={data_root}",
        "data.dataset=toy", "data.attack=badnets", "data.max_length=16", "data.ref_size=8", "train.epochs=1",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=1e-3", "mslr.scales=[1,2,4]",
        "canary.rate=0.1", *overrides,
    ]


def _cfg(tmp_path, model_dir, data_root, *overrides):
    cfg = load_config(None, _args(tmp_path, model_dir, data_root, *overrides))
    return resolve_defaults(cfg, model_type="bert", hidden_size=64, is_decoder=False)


def test_train_on_reference_appends_the_trusted_rows_after_the_filter_and_the_canary(tmp_path, tiny_bert_dir,
                                                                                   tiny_data_root):
    cfg = _cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=vanilla", "data.train_on_reference=true")
    _, rows = training._training_data(cfg)
    planted, canary = training._plant_canary(cfg, rows)
    added = training._add_reference_rows(cfg, planted)
    n_file, n_ref = len(planted.train), len(rows.reference)
    assert len(added.train) == n_file + n_ref and n_ref == 8
    assert list(added.train["text"][:n_file]) == list(planted.train["text"])
    assert list(added.train["text"][n_file:]) == list(rows.reference["text"])
    assert list(added.train["label"][n_file:]) == list(rows.reference["label"])  # trusted rows keep their labels
    def canaried(text):
        return set(canary.spec.trigger) <= set(text.split())

    # the canary is planted in the file's rows only
    assert sum(map(canaried, added.train["text"][:n_file])) == len(canary.planted) > 0
    assert not any(map(canaried, added.train["text"][n_file:]))
    assert added.reference is planted.reference and added.selection is planted.selection
    off = _cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=vanilla")
    assert training._add_reference_rows(off, planted) is planted


def test_train_on_reference_is_refused_with_ref_only():
    with pytest.raises(ConfigError, match=r"data\.train_on_reference.*method=ref_only.*Fix: set data\.train_on_reference=false"):
        load_config(None, ["method=ref_only", "data.train_on_reference=true"])


def test_a_vanilla_run_with_the_trusted_rows_trains_on_them(tmp_path, tiny_bert_dir, tiny_data_root):
    from launch import train as launcher

    assert launcher.main(_args(tmp_path, tiny_bert_dir, tiny_data_root, "method=vanilla", "data.train_on_reference=true")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _, rows = training._training_data(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=vanilla"))
    assert metrics["global_steps"] == math.ceil((len(rows.train) + 8) / 8)  # one epoch over file + trusted rows
    assert metrics["config"]["data"]["train_on_reference"] is True and metrics["recipe"] is None


@pytest.mark.parametrize("recipe", ["defended", "authors"])
def test_the_launcher_says_which_recipe_defended_the_run(tmp_path, tiny_bert_dir, tiny_data_root, capsys, recipe):
    from launch import train as launcher

    extra = [] if recipe == "defended" else ["recipe=authors"]  # defended is musclelora's default
    assert launcher.main(_args(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora", *extra)) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    used = metrics["config"]
    assert metrics["recipe"] == recipe and f"method=musclelora recipe={recipe} " in out
    assert f"the trigger adds {metrics['asr'] - metrics['clean_fpr']:.1f} points" in out
    if recipe == "defended":
        assert used["filter"]["method"] == "lexical_zscore" and metrics["filter"]["method"] == "lexical_zscore"
        assert [used["align"][k] for k in ("min_ref_loss", "min_ref_grad_norm", "max_raw_ratio", "start_epoch")] == [0, 0, 0, 0]
        assert "defence (recipe=defended, docs/RECIPE.md): training rows filtered by filter.method=lexical_zscore" in out
        assert "gradient of 8 trusted dev-clean rows (8 per step;" in out  # data.ref_size=8 kept, the batch capped
        assert metrics["reference_batch_size"] == 8
        assert (tmp_path / "run" / training.FILTER_REPORT).is_file()
    else:
        assert used["filter"]["method"] == "none" and used["align"]["min_ref_loss"] == 0.4
        assert "defence (recipe=authors): the paper's settings" in out
        assert not (tmp_path / "run" / training.FILTER_REPORT).exists()


def test_resuming_a_run_saved_before_the_recipe_says_to_add_recipe_authors(tmp_path, tiny_bert_dir, tiny_data_root):
    import yaml

    from pipeline.config import config_to_dict

    old = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora", "recipe=authors"))
    del old["recipe"]  # what the code before the recipe key wrote
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    now = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora"))
    with pytest.raises(ConfigError) as info:
        training._check_resumable_config(tmp_path, now)
    problems = info.value.problems
    assert any("filter.method: saved 'none', now 'lexical_zscore'" in p for p in problems)
    assert "Fix: add the override recipe=authors" in problems[-1]
    authors = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=musclelora", "recipe=authors"))
    training._check_resumable_config(tmp_path, authors)  # the settings it was trained with: resumes
    vanilla = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, "method=vanilla"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in vanilla.items() if k != "recipe"}))
    training._check_resumable_config(tmp_path, vanilla)  # other methods ignore the recipe: an old run resumes


def test_resuming_a_defended_run_saved_with_the_training_batch_as_reference_batch(tmp_path, tiny_bert_dir,
                                                                                  tiny_data_root):
    """A recipe=defended run saved when align.ref_batch_size null meant the training batch (before the 16-row
    default): the resume is refused with the override that restores it, and resumes with that override."""
    import yaml

    from pipeline.config import config_to_dict

    settings = ("method=musclelora", "data.ref_size=40", "train.batch_size=32")
    old = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, *settings))
    assert old["align"]["ref_batch_size"] == 16
    old["align"]["ref_batch_size"] = None  # what the code before the 16-row default resolved to (train.batch_size 32)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    now = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, *settings))
    with pytest.raises(ConfigError) as info:
        training._check_resumable_config(tmp_path, now)
    problems = info.value.problems
    assert any("align.ref_batch_size: saved 32, now 16" in p for p in problems)
    assert "Fix: add the override align.ref_batch_size=32" in problems[-1]
    again = config_to_dict(_cfg(tmp_path, tiny_bert_dir, tiny_data_root, *settings, "align.ref_batch_size=32"))
    training._check_resumable_config(tmp_path, again)  # the batch it was trained with: resumes


def test_the_printout_names_the_two_run_workflow_only_when_a_musclelora_filter_found_a_trigger():
    from launch.train import filter_lines

    report = {"method": "lexical_zscore", "rows_removed": 336, "rows_before": 3000, "threshold": 11.44,
              "flagged": [{"feature": w} for w in ("cf", "bb", "mn", "tq", "a b", "c d", "e f")]}
    lines = filter_lines({"method": "musclelora", "filter": report})
    assert lines[0] == ("filter lexical_zscore: removed 336 of 3000 training rows (threshold z 11.44; flagged n-grams: "
                        "'cf', 'bb', 'mn', 'tq', 'a b', 'c d' and 1 more; see filter-report.json)")
    assert len(lines) == 2 and "method=vanilla filter.method=lexical_zscore canary.select=false" in lines[1]
    assert len(filter_lines({"method": "vanilla", "filter": report})) == 1  # already the undefended run
    assert len(filter_lines({"method": "musclelora", "filter": {**report, "rows_removed": 0}})) == 1  # found nothing
    assert filter_lines({"method": "musclelora", "filter": {"method": "none"}}) == [] == filter_lines({"method": "lora"})
