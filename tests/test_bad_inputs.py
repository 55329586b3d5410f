"""Hostile and mistaken inputs fail through the CLI with one clear line, and damage nothing.

Every case runs ``tasks.cli.main([...])`` in-process and asserts: a non-zero exit,
exactly one ``error:`` line on stderr that names the field or file (progress
bars aside), no traceback, and nothing written or damaged: a fresh ``--out`` is
not created (or holds only the run marker, for inputs that are only found bad
when a stage reads them), and a pre-existing run directory or file is
byte-for-byte unchanged.

Cases that need trained artifacts (a tiny prepare -> cache-teacher -> train ->
compile run, built once per module) or saved model directories are slow+ci;
the config, params-file, data and model-spec cases are fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ast_core.models import load_model, load_tokenizer, tiny_config
from ast_core.sparse import SparseLinear, SparsityError, find_target_linears, sparsify
from tasks.cli import main
from tasks.common import RunContext, StageError
from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "params" / "tiny.yaml"
# the trained fixture's budget: every case on the run copy passes the same overrides, so stage
# fingerprints match and only the hostile change differs
SMALL = ("--no-progress --set train.steps=4 --set train.checkpoint_every=2 --set train.warmup_steps=1 "
         "--set train.refresh_every=2 --set data.max_train_blocks=16")
PROGRESS = re.compile(r"\d+/\d+ \[|it/s\]|^(INFO|DEBUG) ")  # tqdm bars and log lines are not messages
SLOW = [pytest.mark.slow, pytest.mark.ci]


@dataclass(frozen=True)
class Case:
    """One bad input: the CLI line, what the message must name, and what must stay untouched."""
    argv: str                        # placeholders: {tiny} {out} {inp} {models} {run} {small} {repo}
    needles: tuple[str, ...]         # all must appear in the one error line
    rc: int = 2
    stream: str = "err"              # "out" for `verify`, whose failing report is its output
    out_may_hold: tuple[str, ...] = ()  # files a fresh --out may hold (the run marker of `run`)
    keep: str | None = None          # a path that must be byte-for-byte unchanged
    absent: tuple[str, ...] = ()     # paths that must not exist afterwards
    damage: Callable[[Path], None] | None = None  # corrupts the run copy first (the hostile artifact)
    checkpoints: bool = False        # the run copy keeps train/checkpoints


# ----------------------------------------------------------------------------- artifact corruptions

def _truncate_every_checkpoint(run: Path) -> None:
    """An interrupted training (no done.json, no final/) whose checkpoints were all cut in half
    (with one intact checkpoint left, --resume falls back to it: tests/test_fault_injection.py)."""
    (run / "train" / "done.json").unlink()
    shutil.rmtree(run / "train" / "final")
    for step in ("step_000002", "step_000004"):
        f = run / "train" / "checkpoints" / step / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _break_export_group(run: Path) -> None:
    f = run / "export" / "hf" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.k_proj.weight"][0, :4] = 1.0  # four non-zeros in a group of four
    save_file(tensors, str(f), metadata={"format": "pt"})


def _corrupt_trained_mask(run: Path) -> None:
    """The trained model's mask keeps 4 of 4 in one group; compile has not run yet."""
    f = run / "train" / "final" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.mlp.up_proj.mask"][3, :4] = True
    save_file(tensors, str(f))
    meta_file = run / "train" / "final" / "meta.json"  # as if training had written it: its checksum fits
    meta = json.loads(meta_file.read_text())
    meta["sha256"]["model.safetensors"] = hashlib.sha256(f.read_bytes()).hexdigest()
    meta_file.write_text(json.dumps(meta))
    shutil.rmtree(run / "compile")
    shutil.rmtree(run / "export")


def _truncate_cache_shard(run: Path) -> None:
    shard = sorted((run / "cache_teacher" / "cache").glob("shard_*.logp.npy"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


RUN = "run --no-progress --params {tiny} --out {out} --set "
FAILS_IN_PREPARE = dict(out_may_hold=("run.json",))

CASES = [
    # --- config: unknown keys, wrong types, out-of-range values (refused before any work)
    pytest.param(Case("run --params {inp}/unknown.yaml --out {out}", ("unknown.yaml", "unknown key 'bogus'")),
                 id="cfg-unknown-top-level-key-in-file"),
    pytest.param(Case(RUN + "bogus=1", ("unknown key 'bogus'",)), id="cfg-unknown-top-level-key-by-set"),
    pytest.param(Case(RUN + "train.lrr=1", ("unknown key 'train.lrr'",)), id="cfg-unknown-nested-key"),
    pytest.param(Case(RUN + "evaluate.zero_shot.limt=3", ("unknown key 'evaluate.zero_shot.limt'",)),
                 id="cfg-unknown-deeply-nested-key"),
    pytest.param(Case(RUN + "train.steps=abc", ("train.steps", "integer", "'abc'")), id="cfg-string-for-int"),
    pytest.param(Case(RUN + "train.steps=1.5", ("train.steps", "valid integer", "1.5")), id="cfg-fraction-for-int"),
    pytest.param(Case(RUN + "train.steps=true", ("'train.steps'", "valid integer")), id="cfg-bool-for-int"),
    pytest.param(Case(RUN + "model.trust_remote_code=maybe", ("model.trust_remote_code", "boolean")),
                 id="cfg-string-for-bool"),
    pytest.param(Case("run --params {inp}/trainlist.yaml --out {out}", ("trainlist.yaml", "'train'", "dictionary")),
                 id="cfg-list-for-section"),
    pytest.param(Case(RUN + "train=5", ("'train'", "dictionary")), id="cfg-scalar-for-section"),
    pytest.param(Case(RUN + "model.student=", ("model.student",)), id="cfg-empty-student"),
    pytest.param(Case(RUN + "train.lr=-1", ("train.lr", "greater than 0")), id="cfg-negative-lr"),
    pytest.param(Case(RUN + "train.lr=.nan", ("train.lr", "nan")), id="cfg-nan-lr"),
    pytest.param(Case(RUN + "train.steps=0", ("train.steps",)), id="cfg-zero-steps"),
    pytest.param(Case(RUN + "sparsity.n=4", ("sparsity.n must be < sparsity.m", "n=4, m=4")), id="cfg-n-not-below-m"),
    pytest.param(Case(RUN + "train.t0_steps=100", ("train.t0_steps", "100 > 20")), id="cfg-t0-beyond-steps"),
    pytest.param(Case(RUN + "train.warmup_steps=100", ("train.warmup_steps",)), id="cfg-warmup-beyond-steps"),
    pytest.param(Case(RUN + "train.min_lr=1", ("train.min_lr",)), id="cfg-min-lr-above-lr"),
    pytest.param(Case(RUN + "data.seq_len=4", ("data.seq_len",)), id="cfg-seq-len-too-short"),
    pytest.param(Case(RUN + "model.dtype=float64", ("model.dtype", "float64")), id="cfg-unknown-dtype"),
    pytest.param(Case(RUN + "train.method=sgd", ("train.method", "sgd")), id="cfg-unknown-method"),
    pytest.param(Case(RUN + "train.parallel=zero3", ("train.parallel", "'ddp'", "'fsdp'")),
                 id="cfg-unknown-parallel"),
    pytest.param(Case(RUN + "train.refresh_score=gradient", ("train.refresh_score", "'magnitude'", "'wanda'")),
                 id="cfg-unknown-refresh-score"),
    pytest.param(Case(RUN + "train.slorb_init=svd", ("train.slorb_init", "'mean'", "'lstsq'")),
                 id="cfg-unknown-slorb-init"),
    pytest.param(Case(RUN + "evaluate.zero_shot.tasks=[]", ("evaluate.zero_shot.tasks", "empty")),
                 id="cfg-empty-task-list"),
    pytest.param(Case(RUN + "evaluate.zero_shot.tasks=[nope]", ("evaluate.zero_shot.tasks", "nope")),
                 id="cfg-unknown-task"),
    pytest.param(Case("run --params {tiny} --set name=../escape", ("'name'", "../escape"),
                      absent=("{repo}/escape",)), id="cfg-name-escapes-artifacts-dir"),
    pytest.param(Case("run --params {tiny} --set name=..", ("'name'", "..")), id="cfg-name-is-dot-dot"),
    pytest.param(Case(RUN + "train.steps.x=1", ("train.steps.x", "not a section")), id="cfg-set-into-a-scalar"),
    pytest.param(Case("run --params {tiny} --out {out} --set train.steps", ("--set", "train.steps")),
                 id="cfg-set-without-value"),
    pytest.param(Case(RUN + "train.steps=[", ("--set train.steps", "not valid YAML")), id="cfg-set-bad-yaml"),
    # --- the params file itself
    pytest.param(Case("run --params {inp}/notyaml.yaml --out {out}", ("notyaml.yaml", "not valid YAML")),
                 id="params-not-yaml"),
    pytest.param(Case("run --params {inp}/list.yaml --out {out}", ("list.yaml", "mapping", "list")),
                 id="params-yaml-list"),
    pytest.param(Case("run --params {inp}/empty.yaml --out {out}", ("empty.yaml", "is empty")), id="params-empty"),
    pytest.param(Case("run --params {inp}/missing.yaml --out {out}", ("missing.yaml", "not found")),
                 id="params-missing"),
    pytest.param(Case("run --params {inp}/binary.yaml --out {out}", ("binary.yaml", "not a text file")),
                 id="params-binary"),
    pytest.param(Case("run --params {inp} --out {out}", ("params file", "{inp}")), id="params-is-a-directory"),
    pytest.param(Case("run --params {inp}/noname.yaml --out {out}", ("noname.yaml", "missing required key 'name'")),
                 id="params-without-name"),
    pytest.param(Case("run --params {inp}/pytag.yaml --out {out}", ("pytag.yaml", "not valid YAML"),
                      absent=("{inp}/PWNED",)), id="params-python-object-tag-is-not-executed"),
    # --- model specs (found bad when prepare loads the tokenizer)
    pytest.param(Case(RUN + "model.student={inp}/no_such_model", ("model path not found", "no_such_model"),
                      **FAILS_IN_PREPARE), id="model-missing-path"),
    pytest.param(Case(RUN + "model.student={inp}/no_config", ("no_config", "no config.json"), **FAILS_IN_PREPARE),
                 id="model-dir-without-config"),
    pytest.param(Case(RUN + "model.student=tiny:mamba", ("tiny:mamba", "tiny:llama"), **FAILS_IN_PREPARE),
                 id="model-unknown-tiny-arch"),
    pytest.param(Case(RUN + "model.student=embedded:gpt5", ("embedded:gpt5", "embedded:smollm2-135m"),
                      **FAILS_IN_PREPARE), id="model-unknown-embedded-name"),
    # --- data
    pytest.param(Case(RUN + "data.source={inp}/no_such.jsonl", ("no_such.jsonl", "not found"), **FAILS_IN_PREPARE),
                 id="data-missing-file"),
    pytest.param(Case(RUN + "data.source={inp}/empty.jsonl", ("empty.jsonl", "is empty"), **FAILS_IN_PREPARE),
                 id="data-empty-file"),
    pytest.param(Case(RUN + "data.source={inp}/bad.jsonl", ("bad.jsonl:3", "not valid JSON"), **FAILS_IN_PREPARE),
                 id="data-jsonl-bad-line-numbered"),
    pytest.param(Case(RUN + "data.source={inp}/notext.jsonl", ("notext.jsonl:2", "'text'"), **FAILS_IN_PREPARE),
                 id="data-jsonl-record-without-text"),
    pytest.param(Case(RUN + "data.source={inp}/short.txt", ("too short for one block", "seq_len=64"),
                      **FAILS_IN_PREPARE), id="data-shorter-than-one-block"),
    pytest.param(Case(RUN + "data.source={inp}/fake.jsonl.gz", ("fake.jsonl.gz", "gzip"), **FAILS_IN_PREPARE),
                 id="data-gz-that-is-not-gzip"),
    pytest.param(Case(RUN + "data.source={inp}/latin1.txt", ("latin1.txt", "UTF-8"), **FAILS_IN_PREPARE),
                 id="data-not-utf8"),
    pytest.param(Case(RUN + "data.source={inp}/no_data_files", ("no_data_files", "no .txt"), **FAILS_IN_PREPARE),
                 id="data-dir-without-data-files"),
    # --- output location
    pytest.param(Case("run --no-progress --params {tiny} --out {inp}/a_file", ("a_file", "File exists"),
                      keep="{inp}/a_file"), id="out-is-an-existing-file"),
    pytest.param(Case("verify {inp}/no_config", ("no_config", "no safetensors checkpoint")), id="verify-not-an-export"),
    # --- models that load but cannot be used (need saved model dirs and the trained run copy)
    pytest.param(Case("stage cache-teacher {small} --params {tiny} --out {run} "
                      "--set model.teacher={models}/extra_token", ("tokenizers differ", "49153 vs 49152"),
                      keep="{run}"),
                 id="model-teacher-tokenizer-differs", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set model.student={models}/odd130",
                      ("model.layers.0.mlp.down_proj (in_features=130)", "M=4"), keep="{run}"),
                 id="model-in-features-not-divisible-by-4", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set model.student={models}/remote",
                      ("remote", "trust_remote_code"), keep="{run}", absent=("{models}/remote/PWNED",)),
                 id="model-remote-code-is-not-run-by-default", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set train.slorb_group=48",
                      ("group size 48", "model.layers.0.self_attn.q_proj (in_features=64)"), keep="{run}"),
                 id="slorb-group-not-dividing-in-features", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set train.slorb_group=48 "
                      "--set train.slorb_init=lstsq",
                      ("group size 48", "model.layers.0.self_attn.q_proj (in_features=64)"), keep="{run}"),
                 id="slorb-group-not-dividing-in-features-lstsq-init", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set sparsity.exclude=[.]",
                      ("no linear layers found",), keep="{run}"),
                 id="model-no-linears-left-to-sparsify", marks=SLOW),
    # --- damaged artifacts
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --resume",
                      ("no intact checkpoint", "step_000004/model.safetensors", "step_000002/model.safetensors",
                       "truncated", "without --resume"), keep="{run}",
                      damage=_truncate_every_checkpoint, checkpoints=True),
                 id="artifact-every-checkpoint-truncated-on-resume", marks=SLOW),
    pytest.param(Case("verify {run}/export/hf", ("model.layers.0.self_attn.k_proj", "violate 2:4"), rc=1,
                      stream="out", keep="{run}", damage=_break_export_group),
                 id="artifact-export-not-2-4", marks=SLOW),
    pytest.param(Case("stage compile {small} --params {tiny} --out {run}",
                      ("compile refused", "model.layers.1.mlp.up_proj"), keep="{run}", damage=_corrupt_trained_mask),
                 id="artifact-trained-mask-not-2-4-refused-by-compile", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set train.lr=0.002",
                      ("shard_00000.logp.npy", "truncated"), keep="{run}", damage=_truncate_cache_shard),
                 id="artifact-truncated-teacher-cache-shard", marks=SLOW),
    pytest.param(Case("stage train {small} --params {tiny} --out {run} --set teacher_cache.k=8",
                      ("teacher cache", "16", "8"), keep="{run}"),
                 id="artifact-teacher-cache-built-for-other-k",
                 marks=SLOW),
]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _untracked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AST_TRACKING", "off")  # no MLflow runs in the shared store from failing cases


@pytest.fixture(scope="module")
def hostile_inputs(tmp_path_factory) -> Path:
    """Bad params files, data files and directories (cheap: shared by the fast cases)."""
    d = tmp_path_factory.mktemp("inputs")
    files: dict[str, bytes] = {
        "unknown.yaml": b"name: x\nbogus: 1\n",
        "trainlist.yaml": b"name: x\ntrain: [1, 2]\n",
        "notyaml.yaml": b"name: x\ntrain: {steps: [unclosed\n",
        "list.yaml": b"- name\n- x\n",
        "empty.yaml": b"",
        "binary.yaml": b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00\x01",
        "noname.yaml": b"seed: 0\n",
        "pytag.yaml": f'name: x\nmodel: !!python/object/apply:os.system ["touch {d}/PWNED"]\n'.encode(),
        "empty.jsonl": b"",
        "bad.jsonl": b'{"text": "hello world"}\n{"text": "again"}\n{"text": broken}\n',
        "notext.jsonl": b'{"text": "fine"}\n{"body": "no text field"}\n',
        "short.txt": b"hi",
        "fake.jsonl.gz": b"this is not gzip data",
        "latin1.txt": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 50,
        "a_file": b"precious\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "no_config").mkdir()
    (d / "no_config" / "README").write_text("not a model\n")
    (d / "no_data_files").mkdir()
    (d / "no_data_files" / "notes.md").write_text("no data here\n")
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> Path:
    """Local model directories that load but must be refused (built from tiny:llama, offline)."""
    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer("tiny:llama")
    base = load_model("tiny:llama")

    extra = root / "extra_token"  # same weights, one token more: distillation must refuse it
    base.save_pretrained(extra)
    tok2 = load_tokenizer("tiny:llama")
    tok2.add_tokens(["<an_extra_token>"])
    tok2.save_pretrained(extra)

    cfg = tiny_config("llama", len(tok))
    cfg.intermediate_size = 130  # down_proj in_features 130: not a multiple of 4
    odd = root / "odd130"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(odd)
    tok.save_pretrained(odd)

    remote = root / "remote"  # config with auto_map to code that would leave a trace if run
    base.save_pretrained(remote)
    tok.save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="remote_llama", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "remote.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('PWNED').write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class RemoteConfig(LlamaConfig):\n    model_type = 'remote_llama'\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n")
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """prepare -> cache-teacher -> train -> compile on tiny, 4 steps (checkpoints after 2 and 4)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AST_TRACKING", "off")
        for stage in ("prepare", "cache-teacher", "train", "compile"):
            argv = ["stage", stage, "--params", str(TINY), "--out", str(out)] + shlex.split(SMALL)
            assert main(argv) == 0, stage
    return out


def _snapshot(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the test

@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_clear_message_and_damages_nothing(
        case: Case, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    places = {"tiny": str(TINY), "out": str(tmp_path / "out"), "repo": str(REPO), "small": SMALL}
    if "{inp}" in case.argv or any("{inp}" in p for p in (case.keep or "",) + case.absent):
        places["inp"] = str(request.getfixturevalue("hostile_inputs"))
    if "{models}" in case.argv:
        places["models"] = str(request.getfixturevalue("model_dirs"))
    if "{run}" in case.argv:
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("trained_run"), run,
                        ignore=None if case.checkpoints else shutil.ignore_patterns("checkpoints"))
        if case.damage:
            case.damage(run)
        places["run"] = str(run)
    keep = Path(case.keep.format(**places)) if case.keep else None
    before = _snapshot(keep) if keep else None
    capsys.readouterr()

    rc = main(shlex.split(case.argv.format(**places)))

    out, err = capsys.readouterr()
    assert rc == case.rc, f"exit {rc}, stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS.search(line)]
    if case.stream == "err":
        assert len(lines) == 1 and lines[0].startswith("error: "), f"want one error line, got {lines}"
        message = lines[0]
    else:
        assert not lines, lines
        message = out
    for needle in case.needles:
        assert needle.format(**places) in message, f"{needle!r} not in {message!r}"

    fresh_out = Path(places["out"])
    if fresh_out.exists():
        held = sorted(str(p.relative_to(fresh_out)) for p in fresh_out.rglob("*"))
        assert set(held) <= set(case.out_may_hold), f"--out was written: {held}"
    if keep:
        assert _snapshot(keep) == before, f"{keep} was modified"
    for path in case.absent:
        assert not Path(path.format(**places)).exists(), f"{path} exists: input was executed or written"


# ----------------------------------------------------------------------------- around the CLI

def test_a_run_that_failed_before_any_stage_does_not_lock_its_out_dir(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["run", "--no-progress", "--params", str(TINY), "--out", str(out),
                 "--set", f"data.source={tmp_path}/typo.jsonl"]) == 2
    fixed = RunContext.create(load_config(TINY), out)
    try:
        fixed.claim()
    except StageError as exc:
        pytest.fail(str(exc))


def test_a_layer_with_odd_in_features_is_named_and_can_be_excluded() -> None:
    cfg = tiny_config("llama", 512)
    cfg.intermediate_size = 130
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(SparsityError, match=r"model\.layers\.0\.mlp\.down_proj \(in_features=130\)"):
        sparsify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # refused before changing anything
    names = sparsify(model, exclude=[r"down_proj"])
    assert names and not any("down_proj" in n for n in names)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_a_model_without_linears_or_blocks_is_a_clear_sparsity_error() -> None:
    no_linears = torch.nn.Module()
    no_linears.layers = torch.nn.ModuleList([torch.nn.LayerNorm(8) for _ in range(2)])
    with pytest.raises(SparsityError, match="no linear layers found inside 'layers'"):
        find_target_linears(no_linears)
    with pytest.raises(SparsityError, match="no transformer block list"):
        find_target_linears(torch.nn.Sequential(torch.nn.Linear(8, 8)))
