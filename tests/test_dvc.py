"""`dvc repro` runs the five stages through the one CLI code path, and re-runs only
what a change touches.

The repository is copied into a temporary git repo (DVC wants one) so the real
checkout's artifacts and dvc.lock are never touched. The copy runs a lean
variant of the tiny preset (fewer steps, no zero-shot), selected through
``params.yaml``, so the switch between presets is exercised too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ci]

REPO = Path(__file__).resolve().parents[1]
PRESET = "dvc-test"
STAGES = ("resolve-params", "prepare", "cache-teacher", "train", "compile", "evaluate")


def _lean_preset() -> dict:
    """The tiny preset, cut to what the DVC wiring needs (a few steps, perplexity only)."""
    cfg = yaml.safe_load((REPO / "params" / "tiny.yaml").read_text())
    cfg["name"] = PRESET
    cfg["data"]["max_train_blocks"] = 24
    cfg["train"].update(steps=6, warmup_steps=1, refresh_every=3, checkpoint_every=3)
    cfg["evaluate"].update(max_windows=2, zero_shot={"enabled": False})
    return cfg


def _copy_worktree(dst: Path) -> None:
    """Tracked files plus untracked, non-ignored ones: the working tree without .venv or artifacts."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("artifacts/", "dvc.lock")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _run(repo: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


class DvcRepo:
    """A throw-away copy of the repo with DVC commands bound to it."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.first_repro = ""

    def dvc(self, *args: str) -> str:
        return _run(self.root, self.env, "dvc", *args)

    @property
    def run_dir(self) -> Path:
        return self.root / "artifacts" / PRESET

    @property
    def params_file(self) -> Path:
        return self.root / "params" / f"{PRESET}.yaml"


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> DvcRepo:
    mirror = REPO.parent / "shared" / "data"
    if not mirror.exists():
        pytest.skip(f"real data mirror not found at {mirror}")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    root = tmp_path_factory.mktemp("dvc") / "repo"
    root.mkdir()
    _copy_worktree(root)
    (root / "params" / f"{PRESET}.yaml").write_text(yaml.safe_dump(_lean_preset(), sort_keys=False))
    (root / "params.yaml").write_text(f"preset: {PRESET}\n")
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(root),  # the copy's code, not the editable install's
           "AST_TRACKING": "off", "AST_DATA_MIRROR": str(mirror), "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # `dvc exp run` commits to the copy's git; CI may have no git identity configured
           "GIT_AUTHOR_NAME": "dvc test", "GIT_AUTHOR_EMAIL": "dvc-test@localhost",
           "GIT_COMMITTER_NAME": "dvc test", "GIT_COMMITTER_EMAIL": "dvc-test@localhost"}
    git = ["git", "-c", "init.defaultBranch=main"]
    _run(root, env, *git, "init", "-q")
    _run(root, env, "git", "add", "-A")
    _run(root, env, "git", "commit", "-q", "--no-verify", "-m", "copy")
    repo = DvcRepo(root, env)
    repo.dvc("config", "--local", "core.site_cache_dir", str(root.parent / "site-cache"))
    repo.first_repro = repo.dvc("repro")
    return repo


def test_repro_runs_every_stage_and_writes_metrics(dvc_repo: DvcRepo) -> None:
    assert _ran(dvc_repo.first_repro) == set(STAGES)
    metrics = json.loads((dvc_repo.run_dir / "metrics.json").read_text())
    assert metrics["tokens_trained"] == 6 * 4 * 64 and metrics["ppl_wikitext2"] > 0
    assert (dvc_repo.run_dir / "export" / "hf" / "config.json").exists()
    lock = yaml.safe_load((dvc_repo.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_second_repro_runs_nothing(dvc_repo: DvcRepo) -> None:
    out = dvc_repo.dvc("repro")
    assert _ran(out) == set()
    assert "Stage 'train' didn't change, skipping" in out


def test_training_param_change_reruns_train_compile_evaluate_only(dvc_repo: DvcRepo) -> None:
    cfg = yaml.safe_load(dvc_repo.params_file.read_text())
    cfg["train"]["steps"] = 4
    dvc_repo.params_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = dvc_repo.dvc("repro")
    assert _ran(out) == {"resolve-params", "train", "compile", "evaluate"}
    assert "Stage 'prepare' didn't change" in out and "Stage 'cache-teacher' didn't change" in out
    assert json.loads((dvc_repo.run_dir / "metrics.json").read_text())["tokens_trained"] == 4 * 4 * 64


def test_exp_run_set_param_reruns_only_evaluate(dvc_repo: DvcRepo) -> None:
    out = dvc_repo.dvc("exp", "run", "-S", f"params/{PRESET}.yaml:evaluate.max_windows=1")
    assert _ran(out) == {"resolve-params", "evaluate"}
    assert yaml.safe_load(dvc_repo.params_file.read_text())["evaluate"]["max_windows"] == 1
    assert json.loads((dvc_repo.run_dir / "metrics.json").read_text())["ppl_windows"] == 1
    shown = json.loads(dvc_repo.dvc("exp", "show", "--json"))
    exps = [rev for base in shown for exp in base.get("experiments") or [] for rev in exp["revs"]]
    assert len(exps) == 1, "the experiment is recorded, metrics included (read from the DVC cache)"
    assert exps[0]["data"]["metrics"][f"artifacts/{PRESET}/metrics.json"]["data"]["ppl_windows"] == 1


def test_metrics_show_prints_perplexity(dvc_repo: DvcRepo) -> None:
    shown = json.loads(dvc_repo.dvc("metrics", "show", "--json"))
    on_disk = json.loads((dvc_repo.run_dir / "metrics.json").read_text())
    values = next(iter(shown.values()))["data"][f"artifacts/{PRESET}/metrics.json"]["data"]  # "" is the workspace
    assert values["ppl_wikitext2"] == pytest.approx(on_disk["ppl_wikitext2"])
    assert "ppl_wikitext2" in dvc_repo.dvc("metrics", "show")


def test_plots_show_renders_loss_perplexity_and_flip_rate(dvc_repo: DvcRepo) -> None:
    dvc_repo.dvc("plots", "show")
    html = (dvc_repo.root / "artifacts" / "dvc_plots" / "index.html").read_text()  # .dvc/config plots.out_dir
    for plot in ("loss", "perplexity", "flip-rate"):
        assert f'<div id = "{plot}"' in html, plot
    # offline: the Vega plots need a CDN, the PNGs are copied beside the page and shown as <img>
    static = dvc_repo.root / "artifacts" / "dvc_plots" / "static"
    for name in ("train_loss", "train_flip_rate", "train_schedule", "ppl"):
        png = static / f"workspace_artifacts_{PRESET}_plots_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f'<img src="static/{png.name}">' in html
    data = json.loads(dvc_repo.dvc("plots", "show", "--json"))["data"]
    flips = data["flip-rate"][0]["content"]["data"]["values"]
    assert {row["step"] for row in flips} >= {"3"} and all("flip_rate_init" in row for row in flips)
    steps = {row["step"] for row in data["loss"][0]["content"]["data"]["values"]}
    assert steps == {str(s) for s in range(1, max(int(s) for s in steps) + 1)}


# ----------------------------------------------------------------------------- declarations vs code

# modules that only record a run (MLflow, PNGs, progress bars): they change no stage output
RECORDING = {"tasks/tracking.py", "tasks/run_record.py", "tasks/plots.py", "ast_core/progress.py"}
ENTRY = ("tasks/cli.py", "tasks/pipeline.py")  # every stage's command; they dispatch, not traversed


def _project_imports(rel: str) -> set[str]:
    """Project modules that ``rel`` imports anywhere (module level or inside functions), as paths."""
    import ast
    tree = ast.parse((REPO / rel).read_text())
    pkg = rel.rsplit("/", 1)[0].replace("/", ".")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        path = name.replace(".", "/")
        if (REPO / f"{path}.py").is_file() and path.split("/")[0] in ("ast_core", "tasks"):
            out.add(f"{path}.py")
        elif (REPO / path / "__init__.py").is_file() and path.split("/")[0] in ("ast_core", "tasks"):
            out.add(f"{path}/__init__.py")
    return out


def _code_closure(start: str) -> set[str]:
    todo, seen = [start], set()
    while todo:
        rel = todo.pop()
        if rel in seen or rel in RECORDING:
            continue
        seen.add(rel)
        if rel not in ENTRY:
            todo.extend(_project_imports(rel))
    return {p for p in seen if not p.endswith("__init__.py")} - RECORDING


def test_each_stage_depends_on_every_module_its_code_imports() -> None:
    """A code change re-runs exactly the stages whose code imports it (``dvc repro`` trusts these lists)."""
    import yaml
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = {"prepare": "tasks/prepare.py", "cache-teacher": "tasks/cache_teacher.py",
               "train": "tasks/train.py", "compile": "tasks/compile.py", "evaluate": "tasks/evaluate.py"}
    missing = {}
    for stage, module in modules.items():
        deps = set(stages[stage]["deps"])
        need = _code_closure(module) | set(ENTRY)
        gap = sorted(need - deps)
        if gap:
            missing[stage] = gap
    assert missing == {}, f"dvc.yaml deps lack modules the stage imports: {missing}"
