"""Hub download paths over real HTTP: a local olah server, the real huggingface_hub / transformers clients.

Every client is a fresh Python (``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` at import)
with its own empty Hub cache; tensors come back as safetensors files. Three clients run in parallel and the
offline one runs after the bank client, reusing its cache. Uploads stay mocked in ``test_hub.py``: olah
accepts none.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file
from testing_common import assert_state_dicts_equal

from wave_hf import TemplateBank, WaveInitializer

pytest_plugins = ["hub_server"]  # the session fixture `hub_server`: one olah server for every module using it

BUILD = dict(depth=1, width=16)  # the tiny bank's template width: one head, fitted scalers in v1


def bank_tensors(init) -> dict:
    """The bank's weights and every fitted scaler set, flat (the client scripts run this same source)."""
    out = {f"bank.{k}": v for k, v in init.bank.state_dict().items()}
    for (d, w, h), s in sorted(init.fitted.items()):
        out.update({f"scalers.{d}x{w}x{h}.{k}": v for k, v in s.state_dict().items()})
    return out


# (a) by commit sha first (a full download into an empty cache), then by tag, then the default revision.
BANK_CLIENT = inspect.getsource(bank_tensors) + '''
from huggingface_hub import HfApi

from wave_hf import WaveInitializer


def load(name, **kwargs):
    init = WaveInitializer.from_pretrained("org/bank", **kwargs)
    save(name, bank_tensors(init))
    save(name + "-built", init.build(**PARAMS["build"]).state_dict())
    return sorted(init.fitted)


probe("sha", lambda: load("sha", revision=PARAMS["sha1"]))
probe("v1", lambda: load("v1", revision="v1"))
probe("main", lambda: load("main"))


def refs():
    got = HfApi().list_repo_refs("org/bank")
    return {"branches": {b.name: b.target_commit for b in got.branches},
            "tags": {t.name: t.target_commit for t in got.tags}}


probe("refs", refs)
'''

# (b) HF_HUB_OFFLINE=1, the bank client's cache, and an endpoint where nothing listens.
OFFLINE_CLIENT = inspect.getsource(bank_tensors) + '''
from wave_hf import WaveInitializer

probe("v1", lambda: save("v1", bank_tensors(WaveInitializer.from_pretrained("org/bank", revision="v1"))))
probe("sha", lambda: save("sha", bank_tensors(WaveInitializer.from_pretrained("org/bank", revision=PARAMS["sha1"]))))
probe("main", lambda: save("main", bank_tensors(WaveInitializer.from_pretrained("org/bank"))))
probe("never_downloaded", lambda: WaveInitializer.from_pretrained("org/vit"))
probe("uncached_revision", lambda: WaveInitializer.from_pretrained("org/bank", revision="v9"))
'''

# (c) no wave_hf import anywhere in this process.
VIT_CLIENT = '''
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification


def run():
    model, info = ViTForImageClassification.from_pretrained("org/vit", output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(load_file(PARAMS["inputs"])["pixel_values"]).logits
    save("logits", {"logits": logits})
    save("state", model.state_dict())
    return {"class": type(model).__name__, **{k: list(v) for k, v in info.items() if k != "error_msgs"}}


probe("vit", run)
'''

# (d) auto classes after `import wave_hf`; (e) the library's errors for an unknown repo and revision.
AUTO_CLIENT = '''
import wave_hf
from transformers import AutoConfig, AutoModel

from wave_hf import WaveInitializer


def auto_config():
    config = AutoConfig.from_pretrained("org/bank")
    return {"class": f"{type(config).__module__}.{type(config).__qualname__}", "model_type": config.model_type,
            "isinstance": isinstance(config, wave_hf.WaveTemplateConfig)}


def auto_model():
    model = AutoModel.from_pretrained("org/bank")
    save("auto_model", model.state_dict())
    return f"{type(model).__module__}.{type(model).__qualname__}"


probe("auto_config", auto_config)
probe("auto_model", auto_model)
probe("unknown_repo", lambda: WaveInitializer.from_pretrained("org/no-such-bank"))
probe("unknown_revision", lambda: WaveInitializer.from_pretrained("org/bank", revision="v9"))
'''


def with_params(script: str, **params) -> str:
    return f"PARAMS = {params!r}\n" + script


@pytest.fixture(scope="module")
def hub(hub_server, tmp_path_factory):
    """Publish bank v1 (tag) and v2 (main) and a built model, then start the three online clients."""
    root = tmp_path_factory.mktemp("hub_http")
    torch.manual_seed(0)
    v1 = WaveInitializer(TemplateBank(tiny_config()))
    v1.add_scalers(v1.scalers_for(1, 16))
    v1.save_pretrained(root / "bank-v1")
    torch.manual_seed(1)
    WaveInitializer(TemplateBank(tiny_config())).save_pretrained(root / "bank-v2")
    sha1 = hub_server.publish("org/bank", root / "bank-v1", tag="v1")
    sha2 = hub_server.publish("org/bank", root / "bank-v2")

    local_v1 = WaveInitializer.from_pretrained(root / "bank-v1")  # what a user with the folder gets
    local_v2 = WaveInitializer.from_pretrained(root / "bank-v2")
    model = local_v1.build(**BUILD)
    model.save_pretrained(root / "vit")
    hub_server.publish("org/vit", root / "vit")
    c = local_v1.config
    pixel_values = torch.randn(3, c.num_channels, c.image_size, c.image_size,
                               generator=torch.Generator().manual_seed(1))
    save_file({"pixel_values": pixel_values}, root / "inputs.safetensors")
    with torch.no_grad():
        logits = model(pixel_values).logits

    bank_cache = root / "cache-bank"
    clients = SimpleNamespace(
        bank=hub_server.client(with_params(BANK_CLIENT, sha1=sha1, build=BUILD), bank_cache),
        vit=hub_server.client(with_params(VIT_CLIENT, inputs=str(root / "inputs.safetensors")), root / "cache-vit"),
        auto=hub_server.client(AUTO_CLIENT, root / "cache-auto"),
    )
    return SimpleNamespace(
        server=hub_server, root=root, sha1=sha1, sha2=sha2, bank_cache=bank_cache, clients=clients,
        v1=bank_tensors(local_v1), v2=bank_tensors(local_v2), model=model, logits=logits,
        built_v1=local_v1.build(**BUILD).state_dict(), built_v2=local_v2.build(**BUILD).state_dict(),
    )


def assert_file_not_found(probe: dict, *names: str) -> None:
    assert "FileNotFoundError" in probe["mro"], f"{probe['type']}: {probe['message']}"
    for name in names:
        assert name in probe["message"], (name, probe["message"])


# ------------------------------------------------------------------------------------------ (a)
def test_server_refs_and_cache_refs_match_the_published_commits(hub):
    got = hub.clients.bank.result()
    refs = got.value("refs")
    assert refs["branches"] == {"main": hub.sha2}
    assert refs["tags"] == {"v1": hub.sha1}
    repo = hub.bank_cache / "models--org--bank"
    assert (repo / "refs" / "v1").read_text() == hub.sha1
    assert (repo / "refs" / "main").read_text() == hub.sha2
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == sorted([hub.sha1, hub.sha2])
    assert [p.name for p in (repo / "snapshots" / hub.sha1 / "scalers").iterdir()]
    assert not (repo / "snapshots" / hub.sha2 / "scalers").exists()


def test_bank_by_tag_sha_and_default_revision(hub):
    got = hub.clients.bank.result()
    assert got.value("v1") == got.value("sha") == [[1, 16, 1]]
    assert got.value("main") == []
    assert_state_dicts_equal(got.tensors("v1"), hub.v1)
    assert_state_dicts_equal(got.tensors("sha"), hub.v1)
    assert_state_dicts_equal(got.tensors("main"), hub.v2)
    assert not torch.equal(hub.v1["bank.templates.o"], hub.v2["bank.templates.o"])


def test_build_from_downloaded_bank_equals_build_from_local_folder(hub):
    got = hub.clients.bank.result()
    assert_state_dicts_equal(got.tensors("v1-built"), hub.built_v1)  # fitted scalers came with the bank
    assert_state_dicts_equal(got.tensors("sha-built"), hub.built_v1)
    assert_state_dicts_equal(got.tensors("main-built"), hub.built_v2)


# ------------------------------------------------------------------------------------------ (b)
@pytest.fixture(scope="module")
def offline(hub):
    hub.clients.bank.result()  # its cache must be complete first
    script = with_params(OFFLINE_CLIENT, sha1=hub.sha1)
    # Any request that got through would fail to connect: the offline answers come from the cache alone.
    return hub.server.client(script, hub.bank_cache, offline=True, endpoint=hub.server.unreachable_endpoint()).result()


def test_offline_loads_every_downloaded_revision_from_the_cache(hub, offline):
    assert_state_dicts_equal(offline.tensors("v1"), hub.v1)
    assert_state_dicts_equal(offline.tensors("sha"), hub.v1)
    assert_state_dicts_equal(offline.tensors("main"), hub.v2)
    for name in ("v1", "sha", "main"):
        offline.value(name)


def test_offline_uncached_repo_or_revision_raises_file_not_found(offline):
    assert_file_not_found(offline.error("never_downloaded"), "'org/vit'", "not in the Hub cache")
    assert_file_not_found(offline.error("uncached_revision"), "'org/bank'", "v9")


# ------------------------------------------------------------------------------------------ (c)
def test_built_model_loads_over_http_with_plain_transformers(hub):
    got = hub.clients.vit.result()
    info = got.value("vit")
    assert info["class"] == "ViTForImageClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert not [m for m in got.modules if m.split(".")[0] == "wave_hf"]
    assert_state_dicts_equal(got.tensors("state"), hub.model.state_dict())
    torch.testing.assert_close(got.tensors("logits")["logits"], hub.logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ (d)
def test_auto_classes_over_http_after_import_wave_hf(hub):
    got = hub.clients.auto.result()
    config = got.value("auto_config")
    assert config == {"class": "wave_hf.configuration_wave.WaveTemplateConfig", "model_type": "wave_templates",
                      "isinstance": True}
    assert got.value("auto_model").endswith(".TemplateBank")
    assert_state_dicts_equal(got.tensors("auto_model"), {k[5:]: v for k, v in hub.v2.items()
                                                          if k.startswith("bank.")})


# ------------------------------------------------------------------------------------------ (e)
def test_unknown_repo_or_revision_raises_file_not_found(hub):
    got = hub.clients.auto.result()
    assert_file_not_found(got.error("unknown_repo"), "'org/no-such-bank'")
    assert_file_not_found(got.error("unknown_revision"), "'org/bank'", "v9")
