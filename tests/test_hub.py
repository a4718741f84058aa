"""`align.hub`: export what a stage wrote, then push it with the real huggingface_hub client to a local fake hub
(tests/hubserver.py) or to an fsspec folder; the token never shows; every refusal comes before any upload."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sft_recipe, write_recipe
from hubserver import FakeHub

from align.errors import RecipeError
from align.hub import export, is_hub_target, publish, push, scrub

TOKEN = "hf_testAlignPushToken0123456789abcdefXYZ"
ADAPTER_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
}
# What a CLI does with an AlignError: its message on stderr, its exit code.
DRIVER = """
import json, sys
from align import hub
from align.errors import AlignError
args = json.loads(sys.argv[1])
try:
    print("URL", getattr(hub, args.pop("fn", "push"))(**args))
except AlignError as e:
    print(f"align: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


@pytest.fixture(scope="module")
def run(adapters_run) -> Path:
    """A real run (conftest.adapters_run, shared with test_merge.py): LoRA SFT with merge, DoRA SFT on the base, LoRA
    SFT on top of the first, a LoRA reward model, an eval stage."""
    return adapters_run


def names(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def hub_env(endpoint: str, tmp: Path, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp / "hf-home"),  # no stored login of this machine; caches stay in the test folder
        HF_HUB_ETAG_TIMEOUT="3",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def push_in_subprocess(
    endpoint: str, tmp: Path, token: str | None = TOKEN, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_ENDPOINT when imported: every push runs in a fresh interpreter."""
    args = {"commit_message": "upload", **kw}
    args.update({k: str(v) for k, v in args.items() if isinstance(v, Path)})
    return subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(args)],
        env=hub_env(endpoint, tmp, token, **(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_no_token(res: subprocess.CompletedProcess, *folders: Path) -> None:
    assert TOKEN not in res.stdout and TOKEN not in res.stderr
    for folder in folders:
        for f in folder.rglob("*"):
            assert not f.is_file() or TOKEN.encode() not in f.read_bytes(), f


@pytest.fixture
def adapter_export(run, tmp_path) -> Path:
    return export(run / "sft", "adapter", tmp_path / "export", base_hub_id="base-org/tiny-llama")


# ---------------------------------------------------------------- export


def test_export_adapter_names_its_base_by_hub_id(run, adapter_export, tiny_llama):
    assert names(adapter_export) == ADAPTER_FILES
    cfg = json.loads((adapter_export / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "base-org/tiny-llama"
    card = (adapter_export / "README.md").read_text()
    assert (
        card.startswith("---\nbase_model: base-org/tiny-llama\n") and "base_model:adapter:base-org/tiny-llama" in card
    )
    for f in adapter_export.iterdir():
        text = f.read_bytes()
        assert str(tiny_llama).encode() not in text and str(run).encode() not in text, f.name
    original = (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (adapter_export / "adapter_model.safetensors").read_bytes() == original
    assert [p.name for p in adapter_export.parent.iterdir()] == ["export"]  # no temporary folder left


def test_export_adapter_needs_a_hub_id(run, tmp_path):
    for bad, match in [(None, "must name its base model by hub id"), ("/data/models/x", "not a hub model id")]:
        with pytest.raises(RecipeError, match=match) as e:
            export(run / "sft", "adapter", tmp_path / "a", base_hub_id=bad)
        assert e.value.exit_code == 2
    with pytest.raises(RecipeError, match="not a hub model id"):
        export(run / "sft", "adapter", tmp_path / "a", base_hub_id="./models/x")
    with pytest.raises(RecipeError, match=r"trained on stage `sft`'s adapter.*merged"):
        export(run / "sft2", "adapter", tmp_path / "a", base_hub_id=None)
    assert not (tmp_path / "a").exists()


def test_export_merged_copies_the_stage_merged_folder(run, tmp_path):
    out = export(run / "sft", "merged", tmp_path / "m", base_hub_id=None)
    assert names(out) == {p for p in names(run / "sft" / "merged") if not p.endswith(".bin")}
    assert (out / "model.safetensors").read_bytes() == (run / "sft" / "merged" / "model.safetensors").read_bytes()


def test_export_merged_folds_a_stage_without_one(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import load_for_inference, locate

    assert not (run / "sft2" / "merged").exists()
    out = export(run / "sft2", "merged", tmp_path / "m", base_hub_id=None)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names(out)
    assert not any(n.endswith(".bin") for n in names(out))
    ids = torch.tensor([[2, 5, 6, 7, 8, 3]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    AutoTokenizer.from_pretrained(out)
    chain = load_for_inference(locate(json.loads((run / "sft2" / "stage.json").read_text())["output"], run / "sft2"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, chain.eval()(ids).logits, atol=1e-4, rtol=0)


def test_export_reward_model(run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = export(run / "rm", "reward", tmp_path / "r", base_hub_id=None)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names(out)
    assert not any(n.endswith(".bin") for n in names(out))
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    with pytest.raises(RecipeError, match="export `reward`"):
        export(run / "rm", "merged", tmp_path / "x", base_hub_id=None)
    with pytest.raises(RecipeError, match="not a reward stage"):
        export(run / "sft", "reward", tmp_path / "x", base_hub_id=None)


def test_export_refusals(run, tmp_path):
    with pytest.raises(RecipeError, match="eval stage"):
        export(run / "ppl", "merged", tmp_path / "x", base_hub_id=None)
    with pytest.raises(RecipeError, match="choose one of adapter, merged, reward"):
        export(run / "sft", "weights", tmp_path / "x", base_hub_id=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("mine")
    with pytest.raises(RecipeError, match="not empty"):
        export(run / "sft", "merged", tmp_path / "full", base_hub_id=None)
    with pytest.raises(RecipeError, match="not done"):
        export(run / ".partial" / "sft", "merged", tmp_path / "x", base_hub_id=None)
    pickled = tmp_path / "pickled"
    (pickled / "model").mkdir(parents=True)
    (pickled / "stage.json").write_text(json.dumps({"type": "sft", "output": {"kind": "model", "path": "model"}}))
    (pickled / "model" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(RecipeError, match=r"no safetensors weights.*pytorch_model\.bin"):
        export(pickled, "merged", tmp_path / "x", base_hub_id=None)
    assert not (tmp_path / "x").exists()


def test_dry_run_exports_only(run, tmp_path, capsys):
    where = publish(
        run / "sft",
        "adapter",
        "my-org/tiny-sft",
        base_hub_id="base-org/tiny-llama",
        commit_message="m",
        dest=tmp_path / "dry",
        dry_run=True,
    )
    assert where == str(tmp_path / "dry") and names(tmp_path / "dry") == ADAPTER_FILES
    assert "dry run: 6 files for my-org/tiny-sft in" in capsys.readouterr().out


# ---------------------------------------------------------------- push to the (fake) hub


def test_push_to_the_hub_on_a_branch(adapter_export, tmp_path):
    with FakeHub() as hub:
        res = push_in_subprocess(
            hub.url,
            tmp_path,
            folder=adapter_export,
            target="my-org/tiny-sft",
            private=True,
            revision="v1",
            commit_message="align: sft adapter",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"URL {hub.url}/my-org/tiny-sft/tree/v1" in res.stdout
        assert hub.unexpected == [], hub.unexpected
        calls = [p for p in hub.paths() if p != "GET /api/agent-harnesses"]
        assert calls == [
            "GET /api/whoami-v2",
            "POST /api/repos/create",
            "POST /api/models/my-org/tiny-sft/branch/v1",
            "POST /api/validate-yaml",  # the client checks README.md's metadata (at HF_ENDPOINT, not the public hub)
            "POST /api/models/my-org/tiny-sft/preupload/v1",
            "POST /api/models/my-org/tiny-sft/commit/v1",
        ]
        create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
        assert json.loads(create["body"]) == {
            "name": "tiny-sft",
            "organization": "my-org",
            "visibility": "private",
            "type": "model",
        }
        assert hub.repos["my-org/tiny-sft"]["visibility"] == "private"
        for r in hub.requests:
            if r["path"] != "/api/agent-harnesses":
                assert r["headers"].get("authorization") == f"Bearer {TOKEN}", r["path"]
        (commit,) = hub.commits
        assert commit["repo"] == "my-org/tiny-sft" and commit["revision"] == "v1" and commit["deleted"] == []
        assert commit["header"]["summary"] == "align: sft adapter"
        assert {p: len(b) for p, b in commit["files"].items()} == {
            p.name: p.stat().st_size for p in adapter_export.iterdir()
        }
        for name, data in commit["files"].items():
            assert data == (adapter_export / name).read_bytes(), name
        assert json.loads(commit["files"]["adapter_config.json"])["base_model_name_or_path"] == "base-org/tiny-llama"
        assert "v1" in hub.repos["my-org/tiny-sft"]["branches"]

        again = push_in_subprocess(hub.url, tmp_path, folder=adapter_export, target="hf://my-org/tiny-sft")
        assert again.returncode == 0, again.stdout + again.stderr  # the repo exists (409): fine; main this time
        assert [c["revision"] for c in hub.commits] == ["v1", "main"]
        assert hub.repos["my-org/tiny-sft"]["visibility"] == "private"  # an existing repo keeps its visibility
    assert_no_token(res, adapter_export)
    assert_no_token(again)


def test_publish_a_merged_model(run, tmp_path):
    """export -> preflight -> push in one call: the stage's merged model, uploaded whole, the temp folder gone."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with FakeHub() as hub:
        res = push_in_subprocess(
            hub.url,
            tmp_path,
            env={"TMPDIR": str(scratch)},
            fn="publish",
            stage_dir=run / "sft",
            what="merged",
            target="my-org/tiny-merged",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        (commit,) = hub.commits
        local = {p.name: p.read_bytes() for p in (run / "sft" / "merged").iterdir() if p.suffix != ".bin"}
        assert commit["files"] == local and commit["header"]["summary"] == "upload"
        assert [p for p in hub.paths() if p.endswith("whoami-v2")] == ["GET /api/whoami-v2"] * 2  # publish + push
    assert f"URL {hub.url}/my-org/tiny-merged/tree/main" in res.stdout
    assert list(scratch.iterdir()) == []  # the temporary export is removed after the push
    assert_no_token(res)


def test_push_to_the_users_own_namespace_is_public_by_default(adapter_export, tmp_path):
    with FakeHub(user="tester", orgs={}) as hub:
        res = push_in_subprocess(hub.url, tmp_path, folder=adapter_export, target="tester/x")
        assert res.returncode == 0, res.stdout + res.stderr
        assert hub.repos["tester/x"]["visibility"] == "public"
        assert [c["revision"] for c in hub.commits] == ["main"]
        assert not any("/branch/" in p for p in hub.paths())


def test_refused_token_401_stops_before_any_upload(adapter_export, tmp_path):
    with FakeHub() as hub:
        hub.fail["whoami"] = (401, "Invalid credentials in Authorization header")
        res = push_in_subprocess(hub.url, tmp_path, folder=adapter_export, target="my-org/x")
        assert res.returncode == 2, res.stdout + res.stderr
        assert "refused the token (401 Unauthorized)" in res.stderr and "HF_TOKEN" in res.stderr
        assert hub.commits == [] and not any("create" in p or "preupload" in p for p in hub.paths())
    assert_no_token(res)
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("status", "match"),
    [(403, "no write permission for `my-org/x`"), (503, "answered 503 to whoami")],
)
def test_whoami_errors_stop_before_any_upload(adapter_export, tmp_path, status, match):
    with FakeHub() as hub:
        hub.fail["whoami"] = (status, "nope")
        res = push_in_subprocess(hub.url, tmp_path, folder=adapter_export, target="my-org/x")
        assert res.returncode == 2 and match in res.stderr, res.stdout + res.stderr
        assert [p for p in hub.paths() if p != "GET /api/agent-harnesses"] == ["GET /api/whoami-v2"]
    assert_no_token(res)


def test_offline_mode_is_named(adapter_export, tmp_path):
    res = push_in_subprocess(
        "http://127.0.0.1:9", tmp_path, env={"HF_HUB_OFFLINE": "1"}, folder=adapter_export, target="my-org/x"
    )
    assert res.returncode == 2 and "HF_HUB_OFFLINE is set" in res.stderr, res.stdout + res.stderr


def test_no_write_permission_403_on_create_repo(adapter_export, tmp_path):
    with FakeHub() as hub:
        hub.fail["create"] = (403, 'You don\'t have the rights to create a model under the namespace "my-org"')
        res = push_in_subprocess(hub.url, tmp_path, folder=adapter_export, target="my-org/x")
        assert res.returncode == 2, res.stdout + res.stderr
        assert "no write permission for `my-org/x`" in res.stderr and "403 Forbidden on create_repo" in res.stderr
        assert hub.commits == [] and not any("preupload" in p or "commit" in p for p in hub.paths())
    assert_no_token(res)


@pytest.mark.parametrize(
    ("hub_kw", "target", "match"),
    [
        ({"role": "read"}, "my-org/x", "is read-only"),
        ({}, "other-org/x", "`tester` is not a member of `other-org`"),
        ({"orgs": {"my-org": "read"}}, "my-org/x", "may only read in `my-org`"),
    ],
)
def test_preflight_refuses_a_namespace_without_write_access(adapter_export, tmp_path, hub_kw, target, match):
    with FakeHub(**hub_kw) as hub:
        res = push_in_subprocess(hub.url, tmp_path, folder=adapter_export, target=target)
        assert res.returncode == 2 and match in res.stderr, res.stdout + res.stderr
        assert [p for p in hub.paths() if p != "GET /api/agent-harnesses"] == ["GET /api/whoami-v2"]
    assert_no_token(res)


def test_no_token_is_a_clear_error(adapter_export, tmp_path):
    with FakeHub() as hub:
        res = push_in_subprocess(hub.url, tmp_path, token=None, folder=adapter_export, target="my-org/x")
        assert res.returncode == 2 and "no Hugging Face token" in res.stderr and "hf auth login" in res.stderr
        assert "GET /api/whoami-v2" not in hub.paths() and hub.commits == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_down_is_one_clear_message_quickly(adapter_export, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    res = push_in_subprocess(endpoint, tmp_path, folder=adapter_export, target="my-org/x")
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"cannot reach the hub at {endpoint}" in res.stderr and "HF_ENDPOINT" in res.stderr
    assert "Traceback" not in res.stderr and time.time() - t0 < 60
    assert_no_token(res)


def test_hub_that_never_answers_times_out(adapter_export, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.time()
        res = push_in_subprocess(endpoint, tmp_path, folder=adapter_export, target="my-org/x")
        took = time.time() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cannot reach the hub" in res.stderr and "no answer within 3 s, HF_HUB_ETAG_TIMEOUT" in res.stderr
    assert took < 60
    assert_no_token(res)


def test_a_file_holding_the_token_is_never_pushed(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    (folder / "notes.md").write_text(f"token={TOKEN}")
    with pytest.raises(RecipeError) as e:  # refused before huggingface_hub is asked anything
        push(folder, "my-org/x", commit_message="m", token=TOKEN)
    assert "notes.md contains the Hugging Face token" in str(e.value) and TOKEN not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the environment's token is looked for too, for a folder target as well
    with pytest.raises(RecipeError, match="notes.md contains the Hugging Face token"):
        push(folder, str(tmp_path / "out"), commit_message="m")
    assert not (tmp_path / "out").exists()


def test_scrub_and_targets(tmp_path, monkeypatch):
    assert scrub(f"Bearer {TOKEN} and hf_{'a' * 34}", TOKEN) == "Bearer *** and hf_***"
    assert is_hub_target("org/name") and is_hub_target("hf://org/name")
    for local in ("./org/name", "/abs/dir", "~/dir", "file:///tmp/x", "s3://bucket/x", "name"):
        assert not is_hub_target(local), local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    with pytest.raises(RecipeError, match="both a hub id and a local folder"):
        is_hub_target("org/name")


# ---------------------------------------------------------------- push to a folder (fsspec)


def test_push_to_a_file_url_and_a_plain_folder(adapter_export, tmp_path):
    url = push(adapter_export, f"file://{tmp_path}/pub", commit_message="m")
    assert url == f"file://{tmp_path}/pub"
    assert names(tmp_path / "pub") == ADAPTER_FILES
    for f in adapter_export.iterdir():
        assert (tmp_path / "pub" / f.name).read_bytes() == f.read_bytes()
    assert push(adapter_export, f"file://{tmp_path}/pub", commit_message="m") == url  # same files again: fine
    assert push(adapter_export, f"file://{tmp_path}/pub", revision="v2", commit_message="m").endswith("/pub/v2")
    assert names(tmp_path / "pub" / "v2") == ADAPTER_FILES
    with pytest.raises(RecipeError, match="already holds other files"):
        (tmp_path / "pub" / "v3").mkdir()
        (tmp_path / "pub" / "v3" / "old.safetensors").write_bytes(b"x")
        push(adapter_export, str(tmp_path / "pub"), revision="v3", commit_message="m")
    push(adapter_export, str(tmp_path / "plain"), commit_message="m")
    assert names(tmp_path / "plain") == ADAPTER_FILES


def test_push_refuses_pickles_and_empty_folders(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(RecipeError, match="empty"):
        push(tmp_path / "p", str(tmp_path / "out"), commit_message="m")
    (tmp_path / "p" / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(RecipeError, match="pickle files"):
        push(tmp_path / "p", str(tmp_path / "out"), commit_message="m")
    assert not (tmp_path / "out").exists()


def test_plan_checks_lora_rank_against_a_hub_model_not_downloaded(tmp_path):
    """A hub model not in the local cache: plan reads its config.json alone (one small file, not the
    weights) to check the LoRA rank against the hidden size; a rank that fits plans clean."""
    with FakeHub() as hub:
        hub.files[("org/remote-tiny", "config.json")] = {"model_type": "llama", "hidden_size": 32}
        results = {}
        for r in (64, 8):
            recipe = sft_recipe(tmp_path, Path("unused"))
            recipe["model"] = "org/remote-tiny"
            recipe["stages"][0]["adapter"]["r"] = r
            path = write_recipe(tmp_path, recipe, name=f"r{r}.yaml")
            results[r] = subprocess.run(
                [sys.executable, "-m", "align", "plan", str(path)],
                env=hub_env(hub.url, tmp_path, token=None),
                capture_output=True,
                text=True,
                timeout=300,
            )
        got = [p for p in hub.paths() if "resolve" in p]
    bad, good = results[64], results[8]
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "stages[0](sft).adapter.r" in bad.stderr and "hidden size (32)" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert good.returncode == 0, good.stdout + good.stderr
    assert got and all(p.endswith("/config.json") for p in got), got
