"""One rank of a tiny AST run under ``torchrun`` (gloo, CPU), for tests/test_ddp.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/support/ddp_worker.py \
        OUT CACHE [--interrupt-at N] [--fsdp]

Trains the same tiny student as the single-process reference in the test, at the
same *global* batch, distilling from the teacher cache at CACHE. Every rank
writes ``OUT/rank{R}.safetensors`` (its final weights and masks) and
``OUT/rank{R}.json`` (the block ids it read from the cache, its history);
``--interrupt-at N`` stops after N steps and resumes from the last checkpoint
in the same process, as a restarted job would. ``--fsdp`` shards the student
(``train.parallel: fsdp``) instead of replicating it; the saved files are then
the gathered full weights, the same on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ast_core import distributed, sharding  # noqa: E402
from ast_core.checkpoint import state_dict_tensors  # noqa: E402
from ast_core.distributed import DistEnv  # noqa: E402
from ast_core.teacher_cache import TeacherCache  # noqa: E402
from ast_core.train import CachedTeacher, train  # noqa: E402
from tests.support.ddp_reference import CFG, SEED, blocks, student  # noqa: E402


class RecordingTeacher(CachedTeacher):
    """The cached teacher, remembering which blocks this rank asked for."""

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__(cache)
        self.read: list[list[int]] = []

    def kl(self, student_logits, block_ids, input_ids, temperature):  # type: ignore[no-untyped-def]
        self.read.append([int(b) for b in block_ids])
        return super().kl(student_logits, block_ids, input_ids, temperature)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--interrupt-at", type=int, default=None)
    ap.add_argument("--fsdp", action="store_true")
    args = ap.parse_args()
    cfg = CFG.model_copy(update={"parallel": "fsdp"}) if args.fsdp else CFG
    torch.set_num_threads(1)
    env = DistEnv.from_env()
    distributed.init(env, torch.device("cpu"))
    teacher = RecordingTeacher(TeacherCache(args.cache))
    ckpt = args.out / "checkpoints"
    model = student()
    if args.interrupt_at:
        train(model, blocks(), cfg, seed=SEED, teacher=teacher, checkpoint_dir=ckpt, progress=False,
              dist=env, stop_after=args.interrupt_at)
        model = student()  # a restarted job: fresh process state, weights from the checkpoint
    result = train(model, blocks(), cfg, seed=SEED, teacher=teacher, checkpoint_dir=ckpt, progress=False,
                   dist=env, resume=bool(args.interrupt_at))
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_tensors(model), str(args.out / f"rank{env.rank}.safetensors"))
    (args.out / f"rank{env.rank}.json").write_text(json.dumps({
        "rank": env.rank, "world": env.world_size, "read": teacher.read, "history": result.history,
        "resumed_from": result.resumed_from,
        "sharded": [name for name, p in model.named_parameters() if sharding.is_sharded(p)],
        "model_sharded": sharding.model_is_sharded(model)}))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
