"""Files that ship inside the package (accelerate configs, evaluation task files), found by name.

They live under `align/configs/` so a plain, non-editable `pip install` carries them; the top-level
`accelerate_configs/` and `evaluation/tasks/` folders of a source checkout are links to the same files.
Relative data paths in a task file resolve against the current folder first, then the project root of a
source checkout (where `../shared/data/...` paths point), so the shipped tasks work from either.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from align.errors import RecipeError, did_you_mean


def _package_dir(*parts: str) -> Path:
    return Path(str(files("align").joinpath("configs", *parts)))


def accelerate_config_dir() -> Path:
    return _package_dir("accelerate")


def known_accelerate_configs() -> list[str]:
    return sorted(p.stem for p in accelerate_config_dir().glob("*.yaml"))


def accelerate_config_path(name: str) -> Path:
    """A shipped config by name (`multi_cpu`), or a YAML path; a clear error naming the known ones."""
    path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else accelerate_config_dir() / f"{name}.yaml"
    if not path.is_file():
        known = known_accelerate_configs()
        raise RecipeError(
            f"no accelerate config `{name}`{did_you_mean(name, known)}; known: {', '.join(known)} (or a .yaml path)",
            "launch.accelerate_config",
        )
    return path


def task_dir() -> Path:
    return _package_dir("tasks")


def known_tasks() -> list[str]:
    return sorted(p.stem for p in task_dir().glob("*.yaml"))


def project_root() -> Path | None:
    """The source checkout this package runs from (it has pyproject.toml beside src/), else None."""
    here = Path(__file__).resolve()
    root = here.parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "align").is_dir() else None


def data_root(relative: str | Path) -> Path:
    """Where a task file's relative data path points: the current folder if it exists there, else the
    project root of a source checkout, else the current folder (so the error names the path as written)."""
    rel = Path(relative)
    if rel.is_absolute() or rel.exists():
        return Path.cwd()
    root = project_root()
    if root is not None and (root / rel).exists():
        return root
    return Path.cwd()
