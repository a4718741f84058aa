"""Publish what a stage wrote: export exactly the files to upload, then push them to the hub or a folder.

    export(stage_dir, what, dest, base_hub_id=...)   adapter | merged | reward  ->  dest/ (safetensors only)
    preflight(target, token)                         every check that needs no upload: token, endpoint, rights
    push(folder, target, commit_message=...)         ORG/NAME (the hub) | ./folder | file:///... | s3://...
    publish(stage_dir, what, target, ...)            the three in order; `dry_run` stops after the export

Targets. `ORG/NAME` or `hf://ORG/NAME` is a model repo on the hub ($HF_ENDPOINT, default huggingface.co);
anything else is a folder or an fsspec URL: a path (`./out`, `/data/x`, `~/x`), `file:///...`, `s3://...`,
`gs://...` (the fsspec backend must be installed, e.g. s3fs). A relative folder must start with `./`: a bare
`a/b` is a hub id, and refused as ambiguous when a local `a/b` exists.

Revisions. On the hub: a branch, created (from main) when missing; the commit goes there. In a folder: the
files go to `<target>/<revision>/` (without a revision, to `<target>/`). A folder that already holds files
other than those being written is refused, so two models never mix; files of the same name are replaced.

The token. It comes from the environment (HF_TOKEN) or huggingface_hub's stored login (`hf auth login`),
never from a recipe, and it is never written into a message, exception, log line or file: every message
built here is scrubbed of it, hub exceptions are not chained, and `push` refuses a folder whose text files
contain it. Errors that mean "fix the input or the set-up" (no token, endpoint unreachable, token refused,
no write access, bad target, unsafe folder) are `RecipeError` (exit 2); an unexpected hub failure during
the upload is `AlignError` (exit 1). A hub commit is atomic: a failed push leaves the repo as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from align.errors import AlignError, RecipeError
from align.stages.reward import PUSH_WHAT

WHAT = ("adapter", "merged", PUSH_WHAT)
# A hub repo id: NAME or ORG/NAME (what the hub accepts: letters, digits, `-`, `_`, `.`; no `--`, `..`).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_HUB_TARGET = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
# Weights or state in pickle formats, never exported or pushed (safetensors only).
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_TEXT = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml", ".model", ".py", ".cfg")


# ---------------------------------------------------------------- export


def export(stage_dir: Path, what: str, dest: Path, *, base_hub_id: str | None) -> Path:
    """Write into `dest` (absent or empty) exactly the files to upload for a finished stage; returns `dest`.

    - `adapter`: the stage's adapter folder, with `adapter_config.json`'s `base_model_name_or_path` (and the
      model card's `base_model`) set to `base_hub_id`, which is required and must be a hub id. For an adapter
      trained on an earlier stage's adapter, `base_hub_id` must name that stage's merged model.
    - `merged`: the stage's `merged/` folder when it has one, else the adapter folded now (`align.merge`,
      fp32); a stage that trained full weights exports its `model/` folder.
    - `reward`: a reward stage's model folder (a merged sequence classifier).

    Only top-level files are exported; pickles (`*.bin`, `training_args.bin`, ...) never are, and a folder
    whose weights exist only as pickles is refused. Paths of this machine left in a text file are refused."""
    from align.merge import check_out, read_stage

    stage_dir, dest = Path(stage_dir).expanduser(), Path(dest).expanduser()
    if what not in WHAT:
        raise RecipeError(f"cannot export `{what}`; choose one of {', '.join(WHAT)}", "what")
    check_out(dest)
    info = read_stage(stage_dir)
    kind = info["output"]["kind"]
    name = stage_dir.name
    if kind == "metrics":
        raise RecipeError(f"`{name}` is an eval stage: it wrote metrics, no model to export", "what")
    src = stage_dir / info["output"].get("path", "")
    hub_id = None
    if what == "adapter":
        if kind != "adapter":
            alt = PUSH_WHAT if kind == "reward_model" else "merged"
            raise RecipeError(f"stage `{name}` wrote no adapter (its output is a {kind}); export `{alt}`", "what")
        hub_id = _base_hub_id(base_hub_id, info, stage_dir)
    elif what == "merged":
        if kind == "reward_model":
            raise RecipeError(f"stage `{name}` is a reward stage; export `reward`", "what")
        if kind == "adapter":
            merged = info.get("merged")
            src = stage_dir / merged if merged and (stage_dir / merged / "config.json").is_file() else None
    elif kind != "reward_model":
        raise RecipeError(f"stage `{name}` is not a reward stage (its output is a {kind})", "what")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-export-", dir=dest.parent))
    try:
        if src is None:  # an adapter stage without merged/: fold it now
            from align.merge import merge

            merge(stage_dir, tmp / "m")
            src = tmp / "m"
        files = tmp / "files"
        files.mkdir()
        _copy_clean(src, files)
        if what == "adapter":
            _rebase_adapter(files, hub_id)
        _check_no_local_paths(files, _local_paths(info, stage_dir))
        if dest.is_dir():
            dest.rmdir()
        files.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _base_hub_id(base_hub_id: str | None, info: dict[str, Any], stage_dir: Path) -> str:
    base = info["output"].get("base")
    if base_hub_id is None:
        hint = ""
        if isinstance(base, dict) and base.get("kind") == "base_model" and base.get("source") == "hub":
            hint = f" (this run's base model came from the hub as `{base.get('ref')}`)"
        elif isinstance(base, dict) and base.get("kind") == "adapter":
            earlier = Path(base.get("path", "")).parent.name or "the earlier stage"
            hint = (
                f"; this adapter was trained on stage `{earlier}`'s adapter folded into the base, so the id must "
                f"name that folded model (push `{earlier}` as `merged` first), or push this stage as `merged`"
            )
        raise RecipeError(
            "an adapter pushed on its own must name its base model by hub id (ORG/NAME), never a local path: "
            f"pass base_hub_id{hint}",
            "base_hub_id",
        )
    return _check_hub_id(base_hub_id, "base_hub_id")


def _check_hub_id(ref: str, field: str) -> str:
    ref = str(ref).strip()
    if not _HUB_ID.match(ref) or "--" in ref or ".." in ref or ref.endswith(".git"):
        raise RecipeError(f"`{ref}` is not a hub model id (ORG/NAME or NAME); a local path cannot be used", field)
    return ref


def _copy_clean(src: Path, dest: Path) -> None:
    """The top-level files of `src`, without pickles; refuse pickle-only weights."""
    if not src.is_dir():
        raise RecipeError(f"{src} is missing; re-run the stage", "what")
    kept = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue  # checkpoints/ and other folders, hidden files
        if f.suffix.lower() in PICKLES:
            continue
        shutil.copyfile(f, dest / f.name)
        kept.append(f.name)
    if not any(n.endswith(".safetensors") for n in kept):
        pickled = [f.name for f in src.iterdir() if f.suffix.lower() in PICKLES and f.name != "training_args.bin"]
        why = f"its weights are pickles ({', '.join(sorted(pickled))}); re-save them as safetensors" if pickled else ""
        raise RecipeError(f"{src} has no safetensors weights{'; ' + why if why else ''}", "what")


def _rebase_adapter(folder: Path, hub_id: str) -> None:
    """Point the adapter at its base on the hub: adapter_config.json and the model card peft writes."""
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise RecipeError(
            f"the adapter is incomplete (adapter_config.json + adapter_model.safetensors): {folder}", "what"
        )
    cfg = json.loads(cfg_file.read_text())
    old = cfg.get("base_model_name_or_path")
    cfg["base_model_name_or_path"] = hub_id
    cfg["revision"] = None
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text()
        if old:
            text = text.replace(str(old), hub_id)
        card.write_text(_set_card_base(text, hub_id))


def _set_card_base(text: str, hub_id: str) -> str:
    """The model card's YAML front matter with `base_model: hub_id` (peft writes the local folder there)."""
    import yaml

    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return f"---\nbase_model: {hub_id}\nlibrary_name: peft\n---\n\n{text}"
    head, body = text[4:].split("\n---", 1)
    try:
        meta = yaml.safe_load(head) or {}
    except yaml.YAMLError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    meta["base_model"] = hub_id
    tags = [t for t in meta.get("tags") or [] if not str(t).startswith("base_model:")]
    meta["tags"] = [f"base_model:adapter:{hub_id}", *tags]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---" + body


def _local_paths(info: dict[str, Any], stage_dir: Path) -> set[str]:
    """Absolute paths of this machine an exported text file must not carry: the stage and run folders and
    every folder of the chain its output record names (without loading or fetching anything)."""
    found = {str(stage_dir.resolve()), str(stage_dir.resolve().parent)}

    def walk(rec: Any) -> None:
        if isinstance(rec, str):
            found.add(rec)
            found.add(str((stage_dir / rec).resolve()))
        elif isinstance(rec, dict):
            if rec.get("path"):
                found.add(str(rec["path"]))
                found.add(str((stage_dir / str(rec["path"])).resolve()))
            if rec.get("kind") == "base_model":
                found.add(str(rec.get("ref", "")))
            walk(rec.get("base"))

    walk(info["output"])
    return {p for p in found if p and os.path.isabs(p) and p != "/"}


def _check_no_local_paths(folder: Path, paths: set[str]) -> None:
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in _TEXT or f.stat().st_size > 50_000_000:
            continue
        text = f.read_text(errors="replace")
        leaked = sorted(p for p in paths if p in text)
        if leaked:
            raise RecipeError(f"{f.name} would publish the local path {leaked[0]}; edit it out first", "what")


# ---------------------------------------------------------------- targets and the token


def is_hub_target(target: str) -> bool:
    """`hf://ORG/NAME` or `ORG/NAME`: the hub; anything else is a folder or an fsspec URL."""
    if target.startswith("hf://"):
        return True
    if "://" in target or target.startswith((".", "/", "~")) or not _HUB_TARGET.match(target):
        return False
    if Path(target).exists():
        raise RecipeError(
            f"`{target}` is both a hub id and a local folder here; write hf://{target} for the hub or "
            f"./{target} for the folder",
            "target",
        )
    return True


def _repo_id(target: str) -> str:
    repo = target[len("hf://") :] if target.startswith("hf://") else target
    repo = repo.strip("/")
    if not _HUB_TARGET.match(repo) or "--" in repo or ".." in repo:
        raise RecipeError(f"`{target}` is not a hub repo id (ORG/NAME)", "target")
    return repo


def resolve_token(token: str | None = None) -> str | None:
    """The caller's token, else $HF_TOKEN, else huggingface_hub's stored login."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception as e:  # noqa: BLE001 - e.g. an OIDC exchange that failed
        raise RecipeError(f"cannot read the Hugging Face token ({type(e).__name__})", "token") from None


def scrub(text: str, token: str | None) -> str:
    """`text` without the token (nor anything shaped like a hub token)."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unreachable(endpoint: str, why: str) -> RecipeError:
    return RecipeError(
        f"cannot reach the hub at {endpoint} ({why}). Check the network, or set HF_ENDPOINT to a hub you can "
        "reach (a mirror or a local hub); to write the files somewhere else, push to a folder "
        "(./out, file:///..., s3://...) instead",
        "target",
    )


def _describe(e: BaseException, token: str | None) -> str:
    msg = str(e).strip().splitlines()
    return scrub(f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__, token)


def _hub_error(e: BaseException, token: str | None, repo_id: str, action: str) -> AlignError:
    """A hub client exception as one clear, scrubbed error."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = _endpoint()
    if isinstance(e, OfflineModeIsEnabled):
        return RecipeError("HF_HUB_OFFLINE is set: unset it to push to the hub", "target")
    if isinstance(e, HfHubHTTPError):
        code = getattr(e.response, "status_code", None)
        server = scrub(str(getattr(e, "server_message", "") or "").strip()[:200], token)
        detail = f" ({server})" if server else ""
        if code == 401:
            return RecipeError(
                f"the hub at {endpoint} refused the token (401 Unauthorized) on {action}{detail}: it is invalid, "
                "expired or revoked; set a valid HF_TOKEN or run `hf auth login --force`",
                "token",
            )
        if code == 403:
            return RecipeError(
                f"no write permission for `{repo_id}` on {endpoint} (403 Forbidden on {action}){detail}: use a token "
                "with write access to that user or organization, or push to a namespace you own",
                "target",
            )
        return AlignError(f"the hub at {endpoint} answered {code} to {action} for `{repo_id}`{detail}")
    if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore") or isinstance(e, ConnectionError):
        return _unreachable(endpoint, _describe(e, token))
    return AlignError(f"{action} for `{repo_id}` failed: {_describe(e, token)}")


# ---------------------------------------------------------------- preflight


def preflight(target: str, token: str | None) -> None:
    """Everything that can be checked before an upload, as `RecipeError`s with the token scrubbed.

    Hub: a token is there (`token`, else HF_TOKEN, else the stored login); the endpoint answers whoami within
    HF_HUB_ETAG_TIMEOUT seconds (default 10); whoami accepts the token (not 401/403); the token is not
    read-only; the namespace is the token's user or one of its organizations where it may write.
    Folder / fsspec URL: the fsspec backend for it is installed. Nothing is created or uploaded."""
    if not is_hub_target(target):
        _fs_for(target)
        return
    repo_id = _repo_id(target)
    token = resolve_token(token)
    if not token:
        raise RecipeError(
            "no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`; "
            "a recipe never holds the token",
            "token",
        )
    info = _whoami(token, repo_id)
    _check_namespace(info, repo_id, token)


def _whoami(token: str, repo_id: str) -> dict[str, Any]:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    endpoint = _endpoint()
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    try:
        r = get_session().get(f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=timeout)
    except OfflineModeIsEnabled:
        raise RecipeError("HF_HUB_OFFLINE is set: unset it to push to the hub", "target") from None
    except Exception as e:  # noqa: BLE001 - no answer at all: DNS, refused, timeout, proxy
        timed_out = "timeout" in type(e).__name__.lower()
        why = f"no answer within {timeout:g} s, HF_HUB_ETAG_TIMEOUT" if timed_out else _describe(e, token)
        raise _unreachable(endpoint, why) from None
    try:
        hf_raise_for_status(r)
    except HfHubHTTPError as e:
        err = _hub_error(e, token, repo_id, "whoami")
        if not isinstance(err, RecipeError):  # 5xx & co: still before any upload, so exit 2 like the rest
            err = RecipeError(f"{err}; nothing was uploaded, try again later", "target")
        raise err from None
    try:
        data = r.json()
    except ValueError:
        raise _unreachable(endpoint, f"whoami answered {r.status_code} with no JSON: is this a hub?") from None
    return data if isinstance(data, dict) else {}


def _check_namespace(info: dict[str, Any], repo_id: str, token: str) -> None:
    endpoint = _endpoint()
    user = str(info.get("name") or "")
    namespace = repo_id.split("/")[0]
    access = (info.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise RecipeError(
            f"the token of `{user}` on {endpoint} is read-only: no write permission for `{repo_id}`; "
            "create a token with write access",
            "token",
        )
    if namespace.lower() == user.lower():
        return
    orgs = {str(o.get("name", "")).lower(): o for o in info.get("orgs") or [] if isinstance(o, dict)}
    org = orgs.get(namespace.lower())
    if org is None:
        raise RecipeError(
            scrub(
                f"no write permission for `{repo_id}` on {endpoint}: `{user}` is not a member of `{namespace}`; "
                f"push to `{user}/{repo_id.split('/')[1]}` or use a token of a member",
                token,
            ),
            "target",
        )
    if org.get("roleInOrg") == "read":
        raise RecipeError(
            f"no write permission for `{repo_id}` on {endpoint}: `{user}` may only read in `{namespace}`", "target"
        )


# ---------------------------------------------------------------- push


def push(
    folder: Path,
    target: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
    token: str | None = None,
) -> str:
    """Upload every file of `folder` (an `export`) to `target`; returns the URL or path of what was pushed.

    Hub: preflight, `create_repo(exist_ok=True, private=...)` (an existing repo keeps its visibility),
    `create_branch(exist_ok=True)` for a revision other than main, then one commit of all the files to that
    revision with `commit_message`. Returns `<endpoint>/<ORG/NAME>/tree/<revision>`.
    Folder / fsspec URL: the files are copied into `<target>/` (`<target>/<revision>/` for a revision)."""
    folder = Path(folder).expanduser()
    files = _files_to_push(folder)
    if not commit_message or not str(commit_message).strip():
        raise RecipeError("a push needs a commit message", "commit_message")
    if revision is not None and (not str(revision).strip() or ".." in str(revision).split("/")):
        raise RecipeError(f"`{revision}` is not a usable revision name", "revision")
    hub = is_hub_target(target)
    try:
        token = resolve_token(token)
    except RecipeError:
        if hub:
            raise
        token = None  # a folder target needs no token; it is only looked for in the files
    _refuse_token_in_files(folder, files, token)
    if not hub:
        return _push_fs(folder, files, target, revision)
    preflight(target, token)
    return _push_hub(folder, files, _repo_id(target), private, revision, commit_message, token)


def _files_to_push(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise RecipeError(f"{folder} is not a folder; export the stage first", "folder")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if not files:
        raise RecipeError(f"{folder} is empty: nothing to push", "folder")
    pickles = [f for f in files if Path(f).suffix.lower() in PICKLES]
    if pickles:
        raise RecipeError(
            f"{folder} holds pickle files ({', '.join(pickles[:3])}): only safetensors are pushed", "folder"
        )
    return files


def _refuse_token_in_files(folder: Path, files: list[str], token: str | None) -> None:
    if not token:
        return
    needle = token.encode()
    for rel in files:
        f = folder / rel
        if f.suffix == ".safetensors" or f.stat().st_size > 200_000_000:
            continue
        if needle in f.read_bytes():
            raise RecipeError(f"{rel} contains the Hugging Face token: not pushing it; remove it first", "folder")


def _push_hub(
    folder: Path, files: list[str], repo_id: str, private: bool, revision: str | None, message: str, token: str
) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    size = sum((folder / f).stat().st_size for f in files)
    where = f"{repo_id}@{revision}" if revision else repo_id
    print(f"[align] pushing {len(files)} files ({size / 1e6:.1f} MB) to {api.endpoint}/{where}", flush=True)
    step = "create_repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            step = "create_branch"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "commit"
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        info = api.create_commit(
            repo_id, ops, commit_message=message, revision=revision, repo_type="model", token=token
        )
    except Exception as e:  # noqa: BLE001 - every hub failure, as one scrubbed message
        raise _hub_error(e, token, repo_id, step) from None
    url = f"{api.endpoint}/{repo_id}/tree/{quote(revision or 'main', safe='')}"
    print(f"[align] pushed {getattr(info, 'oid', '')[:12]} to {url}", flush=True)
    return url


def _fs_for(target: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(os.path.expanduser(target) if "://" not in target else target)
    except (ImportError, ValueError) as e:
        raise RecipeError(
            f"cannot write to `{target}`: {_describe(e, None)} (install the fsspec backend)", "target"
        ) from None
    return fs, root


def _push_fs(folder: Path, files: list[str], target: str, revision: str | None) -> str:
    fs, root = _fs_for(target)
    dest = root.rstrip("/") + (f"/{revision.strip('/')}" if revision else "")
    try:
        if fs.exists(dest) and not fs.isdir(dest):
            raise RecipeError(f"`{target}` exists and is not a folder", "target")
        present = set()
        if fs.exists(dest):
            prefix = dest.rstrip("/") + "/"
            present = {p[len(prefix) :] if p.startswith(prefix) else p for p in fs.find(dest)}
            present = {p.lstrip("/") for p in present}
        extra = sorted(present - set(files))
        if extra:
            raise RecipeError(
                f"{fs.unstrip_protocol(dest)} already holds other files ({', '.join(extra[:3])}): "
                "push to an empty folder or another revision",
                "target",
            )
        fs.makedirs(dest, exist_ok=True)
        for rel in files:
            parent = f"{dest}/{rel}".rsplit("/", 1)[0]
            if parent != dest:
                fs.makedirs(parent, exist_ok=True)
            fs.put_file(str(folder / rel), f"{dest}/{rel}")
    except RecipeError:
        raise
    except Exception as e:  # noqa: BLE001 - permission, missing credentials, network of the backend
        raise AlignError(f"copying to {target} failed: {_describe(e, None)}") from None
    url = fs.unstrip_protocol(dest)
    print(f"[align] copied {len(files)} files to {url}", flush=True)
    return url


# ---------------------------------------------------------------- all together


def publish(
    stage_dir: Path,
    what: str,
    target: str,
    *,
    base_hub_id: str | None = None,
    commit_message: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    dest: Path | None = None,
    dry_run: bool = False,
) -> str:
    """export -> preflight -> push. The export goes to `dest` (else a temporary folder, removed after the push).
    With `dry_run`, only the export: nothing is contacted, the folder is kept and its path returned."""
    keep = dest is not None or dry_run
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix=f"align-push-{Path(stage_dir).name}-")) / what
    try:
        if not dry_run and is_hub_target(target):
            preflight(target, token)  # before the (possibly long) merge
        folder = export(Path(stage_dir), what, Path(dest), base_hub_id=base_hub_id)
        if dry_run:
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            print(f"[align] dry run: {len(files)} files for {target} in {folder}", flush=True)
            return str(folder)
        return push(folder, target, private=private, revision=revision, commit_message=commit_message, token=token)
    finally:
        if not keep:
            shutil.rmtree(Path(dest).parent, ignore_errors=True)
