"""Hub paths: local folders, a hand-built Hub cache in offline mode, revisions, push_to_hub, auto classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_config
from testing_common import assert_state_dicts_equal
from transformers import AutoConfig, AutoModel

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig
from wave_hf.initializer import DEFAULT_BANK


@pytest.fixture
def offline(monkeypatch):
    """Offline mode as peft's tests set it: both libraries read the flag at import time."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import transformers.utils.hub as t_hub

    if hasattr(t_hub, "is_offline_mode"):
        monkeypatch.setattr(t_hub, "is_offline_mode", lambda: True)


def make_cache(cache: Path, repo_id: str, revisions: dict[str, Path]) -> None:
    """Lay out ``models--org--name/{refs,snapshots}`` exactly as huggingface_hub does."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    for i, (ref, folder) in enumerate(revisions.items()):
        sha = f"{i + 1:040x}"
        (repo / "refs" / ref).write_text(sha)
        shutil.copytree(folder, repo / "snapshots" / sha)


def random_bank(seed: int) -> TemplateBank:
    torch.manual_seed(seed)
    return TemplateBank(tiny_config())


def test_local_folder_round_trip(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    files = sorted(p.name for p in (tmp_path / "bank").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "bank" / "README.md").read_text()
    assert "library_name: wave-hf" in card and "wave-hf" in card
    init = WaveInitializer.from_pretrained(tmp_path / "bank")
    assert_state_dicts_equal(init.bank, tiny_bank)
    assert json.loads((tmp_path / "bank" / "config.json").read_text())["model_type"] == "wave_templates"


def test_auto_classes_without_remote_code(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    assert type(AutoConfig.from_pretrained(tmp_path / "bank")) is WaveTemplateConfig
    model = AutoModel.from_pretrained(tmp_path / "bank")
    assert type(model) is TemplateBank
    assert_state_dicts_equal(model, tiny_bank)


def test_config_round_trips_json(tmp_path):
    cfg = tiny_config(teacher_name_or_path="org/teacher", teacher_dataset="fashion_mnist", metrics={"aux": 0.9})
    cfg.save_pretrained(tmp_path)
    again = WaveTemplateConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()


def test_repo_id_from_offline_cache_with_revisions(tmp_path, offline):
    main, v1 = random_bank(0), random_bank(1)
    main.save_pretrained(tmp_path / "main")
    v1.save_pretrained(tmp_path / "v1")
    make_cache(tmp_path / "cache", "acme/wave-tiny", {"main": tmp_path / "main", "v1": tmp_path / "v1"})
    got_main = WaveInitializer.from_pretrained("acme/wave-tiny", cache_dir=tmp_path / "cache")
    got_v1 = WaveInitializer.from_pretrained("acme/wave-tiny", revision="v1", cache_dir=tmp_path / "cache")
    assert_state_dicts_equal(got_main.bank, main)
    assert_state_dicts_equal(got_v1.bank, v1)
    assert not torch.equal(got_main.bank.templates["o"], got_v1.bank.templates["o"])


def test_unknown_repo_offline_raises_clear_error(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="acme/missing.*not in the Hub cache"):
        WaveInitializer.from_pretrained("acme/missing", cache_dir=tmp_path / "empty-cache")


def test_push_to_hub_sends_a_loadable_folder(tiny_init, tmp_path, monkeypatch):
    """Only the network calls are mocked: the uploaded folder is what from_pretrained reads back."""
    uploaded = tmp_path / "uploaded"

    class FakeRepo:
        repo_id = "acme/pushed"

    def fake_create_repo(self, repo_id, **kwargs):
        assert kwargs.get("exist_ok") is True
        return FakeRepo()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, uploaded)
        return "https://huggingface.co/acme/pushed/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    tiny_init.add_scalers(tiny_init.scalers_for(2, 32, num_heads=2))
    tiny_init.push_to_hub("acme/pushed", token="hf_fake")
    again = WaveInitializer.from_pretrained(uploaded)
    assert_state_dicts_equal(again.bank, tiny_init.bank)
    assert (2, 32, 2) in again.fitted
    assert "library_name: wave-hf" in (uploaded / "README.md").read_text()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """HfApi with its two network calls mocked; records each upload's folder (copied) and keywords."""
    calls: list[dict] = []

    class FakeRepo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def fake_create_repo(self, repo_id, **kwargs):
        return FakeRepo(repo_id)

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / f"upload-{len(calls)}"
        shutil.copytree(folder_path, copy)
        calls.append({"repo_id": repo_id, "folder": copy, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/{len(calls)}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    return calls


def test_second_push_deletes_what_the_new_version_no_longer_has(tiny_init, fake_hub):
    tiny_init.add_scalers(tiny_init.scalers_for(2, 32, num_heads=2))
    tiny_init.push_to_hub("acme/bank", branch="dev", create_pr=True, commit_message="v1")
    first = fake_hub[-1]
    assert (first["revision"], first["create_pr"], first["commit_message"]) == ("dev", True, "v1")
    assert first["delete_patterns"] == ["scalers/*.safetensors"]  # stale scalers of an older version go
    assert (first["folder"] / "scalers").is_dir()
    WaveInitializer(tiny_init.bank).push_to_hub("acme/bank")
    assert not (fake_hub[-1]["folder"] / "scalers").exists()
    assert fake_hub[-1]["delete_patterns"] == ["scalers/*.safetensors"]


def test_merged_model_pushes_and_loads_by_repo_id_from_the_cache(tiny_bank, fake_hub, tmp_path, monkeypatch):
    from transformers import ViTConfig, ViTForImageClassification

    from wave_hf.merge import MergedViT, merge

    def vit(seed):
        torch.manual_seed(seed)
        return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, image_size=28, patch_size=7,
                                                   num_channels=1, num_labels=3))

    merged = merge([vit(0), vit(1)], ["fashion", "digits"], method="average")
    merged.push_to_hub("acme/merged", accuracies={"fashion": 0.5, "digits": 0.25}, branch="v2")
    pushed = fake_hub[-1]
    assert pushed["revision"] == "v2" and (pushed["folder"] / "digits" / "model.safetensors").is_file()
    assert "model-index" in (pushed["folder"] / "README.md").read_text()
    # A repo id resolves through the Hub cache (offline here): a hand-built snapshot of the pushed folder.
    cache = tmp_path / "cache"
    snap = cache / "models--acme--merged" / "snapshots" / ("a" * 40)
    shutil.copytree(pushed["folder"], snap)
    (cache / "models--acme--merged" / "refs").mkdir()
    (cache / "models--acme--merged" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    again = MergedViT.from_pretrained("acme/merged", cache_dir=cache)
    assert again.tasks == ["fashion", "digits"] and again.metadata["accuracies"]["digits"] == 0.25
    assert_state_dicts_equal(again.for_task("digits"), merged.for_task("digits"))


def test_default_bank_is_embedded():
    if not (DEFAULT_BANK / "model.safetensors").is_file():
        pytest.skip("the distilled default bank is not shipped yet")
    init = WaveInitializer.from_pretrained("default")
    assert init.config.teacher_name_or_path
    model = init.build(depth=2, width=init.config.template_width)
    assert model.config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------ bad inputs
def test_wrong_model_type(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    path = tmp_path / "bank" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model_type"] = "vit"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='vit'.*wave_templates"):
        WaveInitializer.from_pretrained(tmp_path / "bank")


def test_missing_safetensors(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    (tmp_path / "bank" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        WaveInitializer.from_pretrained(tmp_path / "bank")


@pytest.mark.parametrize("keep", [0, 100, -16])
def test_truncated_or_empty_safetensors(tiny_bank, tmp_path, keep):
    tiny_bank.save_pretrained(tmp_path / "bank")
    path = tmp_path / "bank" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(OSError, match="model.safetensors|empty|could not read"):
        WaveInitializer.from_pretrained(tmp_path / "bank")


def test_template_of_wrong_shape(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    path = tmp_path / "bank" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["num_templates"] = 4  # the weights hold 3 per type
    path.write_text(json.dumps(cfg))
    with pytest.raises((ValueError, OSError), match="templates|shape|size"):
        WaveInitializer.from_pretrained(tmp_path / "bank")


def test_nan_in_templates(tiny_bank, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_bank.save_pretrained(tmp_path / "bank")
    with torch.no_grad():
        tiny_bank.templates["fc1"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save.*templates.fc1.*NaN"):  # nothing broken is saved
        tiny_bank.save_pretrained(tmp_path / "bank")
    weights = tmp_path / "bank" / "model.safetensors"
    tensors = load_file(weights)
    tensors["templates.fc1"][0, 0, 0] = float("nan")  # a file broken elsewhere is refused at load
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="templates.fc1.*NaN"):
        WaveInitializer.from_pretrained(tmp_path / "bank")


def test_unknown_config_keys_are_dropped_with_warning(tiny_bank, tmp_path, caplog):
    tiny_bank.save_pretrained(tmp_path / "bank")
    path = tmp_path / "bank" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["field_from_the_future"] = 1
    path.write_text(json.dumps(cfg))
    config = WaveTemplateConfig.from_pretrained(tmp_path / "bank")
    assert not hasattr(config, "field_from_the_future")


def test_failed_save_leaves_no_partial_folder(tiny_bank, tmp_path, monkeypatch):
    tiny_bank.save_pretrained(tmp_path / "bank")
    before = (tmp_path / "bank" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("wave_hf.cards.ModelCard.save", boom)
    with pytest.raises(OSError, match="disk full"):
        random_bank(7).save_pretrained(tmp_path / "bank")
    assert (tmp_path / "bank" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
