"""A model card (hub README.md with metadata) for one stage's artifact, built only from the run folder.

The metadata says what the hub needs to place the model: the base model's hub id (never a local path), the
library that loads it, the license of the base where the run can know it (never guessed: without a record the
field is left out), the hub datasets it was trained on, and a model-index carrying every metric the run's eval
stages measured for this stage, with metrics.json's values unrounded. The body reuses `align.report`'s pieces:
the stage chain, the results table, the plots (links relative to the run folder, as `report/<name>.png`; push
`runs/<run>/report/` beside the card), the recipe as run, the data's content hashes and the library versions.
Every string taken from the run goes through `report.public`, so no absolute path or token reaches the card.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from align.errors import AlignError
from align.report import (
    Run,
    Stage,
    base_label,
    datasets_table,
    eval_results,
    git_line,
    hub_datasets,
    is_eval,
    is_trl,
    looks_like_hub_id,
    plot_links,
    plots,
    preference_table,
    public,
    read_run,
    recipe_yaml,
    results_table,
    rl_table,
    stage_chain,
    training_table,
    versions_table,
)
from align.stages.reward import PUSH_WHAT

WHAT = ("adapter", "merged", PUSH_WHAT)
# Licenses as the publisher states them on the model's hub page, for the bases align knows by name.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def build_card(
    run_dir: Path, stage: str, *, what: str = "adapter", repo_id: str | None = None, base_model: str | None = None
) -> ModelCard:
    """The card for `stage`'s adapter, merged model or reward model. `repo_id` (where it will be pushed) names
    the model and is what the loading snippet loads; without it the snippet loads from the run folder.
    `base_model`: the base's hub id where the run cannot tell (a local base folder named by the user)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if what not in WHAT:
        raise AlignError(f"what={what!r}: expected one of {', '.join(WHAT)}")
    try:
        st = run.get(stage)
    except KeyError as e:
        raise AlignError(str(e.args[0])) from None
    if not st.done:
        raise AlignError(f"stage `{stage}` of run {run.name} is not done; run the recipe first")
    artifact = artifact_path(st, what)
    lineage = run.lineage(stage)
    model_name = repo_id.rsplit("/", 1)[-1] if repo_id else f"{run.name}-{stage}"
    base_id = base_model or base_model_id(run, st)
    license_meta = base_license(run, st)
    results = stage_results(run, stage)
    data = ModelCardData(
        model_name=model_name if results else None,  # the model-index's name
        base_model=base_id,
        library_name="peft" if what == "adapter" else "transformers",
        pipeline_tag="text-classification" if what == PUSH_WHAT else "text-generation",
        datasets=hub_datasets(lineage) or None,
        tags=card_tags(lineage, what),
        eval_results=results or None,
        **license_meta,
    )
    body = card_body(run, st, what, artifact, repo_id, model_name, base_id, license_meta.get("license"))
    return ModelCard(public(f"---\n{data.to_yaml()}\n---\n\n{body}"))


# ---------------------------------------------------------------- metadata


def artifact_path(st: Stage, what: str) -> str:
    """The artifact's folder, relative to the stage folder, as stage.json records it."""
    out = (st.info or {}).get("output") or {}
    kind, path = out.get("kind"), out.get("path")
    if what == "adapter":
        if kind == "adapter":
            return str(path)
        hint = f"what='{PUSH_WHAT}'" if kind == "reward_model" else "what='merged'"
        raise AlignError(f"stage `{st.name}` wrote a {kind}, not an adapter; use {hint}")
    if what == "merged":
        merged = (st.info or {}).get("merged")
        if merged:
            return str(merged)
        if kind == "model":  # a full fine-tune: the model itself
            return str(path)
        raise AlignError(f"stage `{st.name}` wrote no merged model; set `merge: true` on it and run the recipe again")
    if kind != "reward_model":
        raise AlignError(f"stage `{st.name}` ({st.type}) wrote no reward model; a `reward` stage does")
    return str(path)


def base_folder(run: Run, st: Stage) -> Path | None:
    """The base model's folder on this machine, if it is there (only ever read, never printed)."""
    rec = ((st.info or {}).get("output") or {}).get("base")
    while isinstance(rec, dict) and rec.get("kind") != "base_model":
        rec = rec.get("base")
    candidates = []
    if isinstance(rec, dict) and rec.get("path"):
        candidates.append(st.folder / rec["path"])
    if run.base.get("kind") == "local":
        candidates.append(Path(str(run.base.get("ref", ""))).expanduser())
    return next((c.resolve() for c in candidates if (c / "config.json").is_file()), None)


def base_model_id(run: Run, st: Stage) -> str | None:
    """The base model's hub id: the embedded model's source, a hub id itself, or, for a local folder, the
    `_name_or_path` its config.json records when that reads as a hub id; else None (the field is left out)."""
    if run.base.get("hub_id"):
        return str(run.base["hub_id"])
    if run.base.get("kind") == "hub" and looks_like_hub_id(str(run.base.get("ref", ""))):
        return str(run.base["ref"])
    folder = base_folder(run, st)
    if folder is not None:
        try:
            name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
        except (OSError, json.JSONDecodeError):
            name = None
        if isinstance(name, str) and looks_like_hub_id(name) and not Path(name).exists():
            return name
    return None


def _readme_license(readme: Path) -> dict[str, str]:
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # a README without valid front matter says nothing about the license
        return {}
    return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}


def base_license(run: Run, st: Stage) -> dict[str, str]:
    """The base's license as its publisher states it: a local folder's README front matter, a hub model's README
    in the local hub cache, or the known license of an embedded/known hub base. Nothing found: {} (omitted)."""
    kind = run.base.get("kind")
    if kind == "local":
        folder = base_folder(run, st)
        return _readme_license(folder / "README.md") if folder and (folder / "README.md").is_file() else {}
    hub = base_model_id(run, st)
    if not hub:
        return {}
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub, "README.md")  # the cache only: building a card needs no network
        if isinstance(cached, str) and (found := _readme_license(Path(cached))):
            return found
    return {"license": KNOWN_LICENSES[hub]} if hub in KNOWN_LICENSES else {}


def card_tags(lineage: list[Stage], what: str) -> list[str]:
    types = [s.type for s in lineage if not is_eval(s)]
    adapters = [str((s.spec.get("adapter") or {}).get("type")) for s in lineage if s.spec.get("adapter")]
    tags = ["align", *types]
    if what == "adapter":
        tags += ["peft", *[a for a in adapters if a != "full"]]
    if what == PUSH_WHAT:
        tags.append("reward-model")
    if any(is_trl(s) for s in lineage):
        tags.append("trl")
    return list(dict.fromkeys(tags))


def stage_results(run_dir: Path | Run, stage: str) -> list[EvalResult]:
    """One EvalResult per task/metric the run's eval stages measured with `stage` as the target (the last eval
    stage wins when two measured the same one). The model-index has no field for a standard error: it is in the
    body's table."""
    run = read_run(run_dir)
    chosen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for ev, r in eval_results(run_dir):
        if str(r.get("target")) == stage:
            chosen[(str(r["task"]), str(r["metric"]))] = (ev, r)
    out = []
    for (task, metric), (ev, r) in chosen.items():
        spec = ((run.get(ev).inputs.get("data") or {}).get(task) or {}).get("spec") or {}
        hub = spec.get("path") if looks_like_hub_id(str(spec.get("path", ""))) else None
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name=task,
                dataset_type=hub or task,
                dataset_name=hub or task,
                dataset_config=spec.get("subset") if hub else None,
                dataset_split=spec.get("split") if hub else None,
                metric_type=metric,
                metric_name=metric,
                metric_value=r["value"],
            )
        )
    return out


# ---------------------------------------------------------------- body


def _in_run(run: Run, st: Stage, rel: str) -> str:
    """A stage-relative path as seen from the folder holding the run (what the snippet's paths assume)."""
    return posixpath.normpath(posixpath.join(run.name, st.name, rel))


def _earlier_adapters(run: Run, st: Stage) -> list[str]:
    """The adapters this one was trained on top of, innermost first (folded into the base before it loads)."""
    chain = []
    rec = ((st.info or {}).get("output") or {}).get("base")
    while isinstance(rec, dict) and rec.get("kind") == "adapter":
        chain.append(_in_run(run, st, rec["path"]))
        rec = rec.get("base")
    return chain[::-1]


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def load_snippet(run: Run, st: Stage, what: str, artifact: str, repo_id: str | None, base_id: str | None) -> str:
    """Python that loads this artifact: PeftModel on the base (earlier adapters folded in first) for an adapter,
    AutoModelForCausalLM for a merged model, AutoModelForSequenceClassification for a reward model."""
    where = repo_id or _in_run(run, st, artifact)
    local = "" if repo_id else "  # in the run folder (paths relative to the folder holding it); or its hub repo"
    chat = _has_chat_template(st.folder / artifact)
    if what == PUSH_WHAT:
        lines = [
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'REWARD_MODEL = "{where}"{local}',
            "tokenizer = AutoTokenizer.from_pretrained(REWARD_MODEL)",
            "model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL)",
        ]
        if chat:
            lines += [
                'messages = [{"role": "user", "content": "Add 2 and 9."}, {"role": "assistant", "content": "11."}]',
                'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)',
            ]
        else:
            lines.append('inputs = tokenizer("Add 2 and 9. 11.", return_tensors="pt")')
        lines += [
            "with torch.no_grad():",
            "    reward = model(**inputs).logits[0, 0].item()  # one score per sequence: higher means preferred",
            "print(reward)",
        ]
        return "\n".join(lines)
    if what == "adapter":
        if base_id:
            base_line = f'BASE = "{base_id}"'
        else:
            name = Path(str(run.base.get("ref", "base"))).name
            base_line = f'BASE = "path/to/{name}"  # the local base model folder `{name}` (not on the hub)'
        lines = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            base_line,
            f'ADAPTER = "{where}"{local}',
            "model = AutoModelForCausalLM.from_pretrained(BASE)",
        ]
        earlier = _earlier_adapters(run, st)
        if earlier:
            lines.append("# this adapter was trained on top of earlier ones: fold them into the base first, in order")
            if repo_id:
                lines.append("# (paths in the run folder, relative to the folder holding it: share them too)")
            lines += [f'model = PeftModel.from_pretrained(model, "{p}").merge_and_unload()' for p in earlier]
        lines += [
            "model = PeftModel.from_pretrained(model, ADAPTER)",
            "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)",
        ]
    else:
        lines = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'MODEL = "{where}"{local}',
            "model = AutoModelForCausalLM.from_pretrained(MODEL)",
            "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
        ]
    if chat:
        lines += [
            'messages = [{"role": "user", "content": "Convert 3 meters to centimeters."}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
        ]
    else:
        lines.append('inputs = tokenizer("Convert 3 meters to centimeters.", return_tensors="pt")')
    lines += [
        "out = model.generate(**inputs, max_new_tokens=32)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
    ]
    return "\n".join(lines)


def _description(run: Run, st: Stage, what: str, lineage: list[Stage]) -> str:
    chain = " → ".join(f"`{s.name}` ({s.type})" for s in lineage)
    adapter = (st.spec.get("adapter") or {}).get("type")
    base = base_label(run.base)
    made = f"stage `{st.name}` ({st.type}) of the align run `{run.name}`"
    if what == PUSH_WHAT:
        return (
            f"A reward model: a sequence classifier with one score, trained by {made} from {base} "
            f"(stages: {chain}). It scores a prompt with its reply; a higher score means preferred."
        )
    if what == "adapter":
        return f"A {adapter} adapter for {base}, trained by {made} (stages: {chain})."
    if adapter == "full":
        return f"A full fine-tune of {base}, trained by {made} (stages: {chain})."
    return f"{base} with the {adapter} adapter of {made} merged into its weights (stages: {chain})."


def card_body(
    run: Run,
    st: Stage,
    what: str,
    artifact: str,
    repo_id: str | None,
    model_name: str,
    base_id: str | None,
    license_id: str | None,
) -> str:
    lineage = run.lineage(st.name)
    names = [s.name for s in lineage]
    measured_by = [ev for ev, r in eval_results(run) if str(r.get("target")) == st.name]
    kind = {"adapter": "adapter", "merged": "merged model", PUSH_WHAT: "reward model"}[what]
    facts = [
        f"- **Base model:** {base_label(run.base)}" + ("" if base_id else " (no hub id recorded)"),
        f"- **Artifact:** the {kind} in `{_in_run(run, st, artifact)}` of the run folder",
        f"- **License:** {license_id}, the base model's"
        if license_id
        else "- **License:** the base model's license is not recorded in this run; state it before publishing",
        f"- **Git commit of the recipe's repository:** {git_line(run)}",
    ]
    parts = [
        f"# {model_name}\n",
        _description(run, st, what, lineage) + "\n",
        "\n".join(facts) + "\n",
        "## How to load\n\n```python\n" + load_snippet(run, st, what, artifact, repo_id, base_id) + "\n```\n",
        "## How it was made\n\n" + stage_chain(run, st.name),
    ]
    for table in (training_table(run, st.name), preference_table(run, st.name), rl_table(run, st.name)):
        if table:
            parts.append(table)
    parts.append(
        "## Evaluation\n\nEvery value is the run's metrics.json's (rounded here; unrounded in the metadata's "
        "model-index, which has no field for a standard error).\n\n"
        + results_table(run, focus=st.name if measured_by else None)
        + plot_links(plots(run), run.folder)
    )
    parts.append("## Recipe as run\n\n" + recipe_yaml(run))
    if table := datasets_table(run, [*names, *measured_by]):
        parts.append("## Datasets\n\n" + table)
    provenance = [
        [f"`{s.name}`", f"`{(s.info or {}).get('fingerprint', '-')}`", f"`{(s.info or {}).get('output_sha256', '-')}`"]
        for s in lineage
    ]
    parts.append(
        "## Reproducibility\n\n"
        + "| stage | fingerprint | output sha256 |\n|---|---|---|\n"
        + "".join("| " + " | ".join(r) + " |\n" for r in provenance)
        + "\n"
        + versions_table(run, names)
    )
    return "\n".join(parts)
