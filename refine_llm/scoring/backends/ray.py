"""`--backend ray`: a Ray Data actor pool scores the fixed batches; scores come back to the driver.

The only module of refine_llm that imports Ray (an optional extra: ``pip install '.[ray]'``).

Data flow (the driver is `refine_llm.scoring.driver`, the same one that runs a local backend):

    questions (Arrow) --driver--> one Ray row per fixed batch (scoring.plan.batch_ranges; list columns of
    the raw question fields) --map_batches(batch_size=1)--> _ScoreActor: an HF or vLLM backend's
    ``score_batch`` (render prompts, tokenize, one forward) --> cache rows + "batch" --iter_batches-->
    driver writes the Arrow score cache

- Prompts are rendered and tokenized in the actors; the driver never loads a model or a tokenizer.
- No shared filesystem is assumed: actors return their tables through Ray's object store and only the
  driver writes the cache (keyed by question id, the same cache as ``--backend hf``), so a lost actor
  only costs its batch (Ray Data restarts actors and retries their tasks: ``max_restarts=-1``,
  ``max_task_retries=-1`` are its defaults for actor pools) and a killed driver resumes from the cache.
- Each batch is scored exactly as the single-process path scores it (same rows, same padding, same code),
  so the scores are bit-identical to a single-process HF run with the same batch size.
- Scorer per actor: the project's HF scorer on CPU (``num_cpus`` per actor, torch limited to that many
  threads), or vLLM when ``gpus_per_actor > 0`` (``num_gpus`` per actor = the tensor-parallel size,
  one engine per actor). The vLLM-per-actor path is UNTESTED: no GPU was available when it was written.

Clusters: ``address`` (or ``$RAY_ADDRESS``) joins an existing cluster and ships this package to it as a
``py_modules`` runtime env (nodes need the same Python dependencies). Otherwise a local cluster starts
and stops with the job, usage stats off, in ``/tmp/rlray-<uid>/<driver pid>``. A driver killed with
SIGKILL takes Ray's GCS, raylet and workers with it (Ray's parent-death signal) but leaves two agent
processes behind; the next local run finds such sessions (owner process gone) and kills what still
holds their directory, by pid, before it starts (Linux ``/proc``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from refine_llm.errors import UserError

__all__ = ["import_ray", "cleanup_stale_sessions", "cluster", "job_cluster", "local_cluster", "RayPool"]

log = logging.getLogger(__name__)

SESSION_ROOT = Path(tempfile.gettempdir()) / f"rlray-{os.getuid()}"  # short: Ray's socket paths are limited
OBJECT_STORE_MB = 512  # local clusters only: scores are small (k ids + k log-probs per prompt)
BATCHES_PER_BLOCK = 4  # Ray rows (= fixed batches) per block: small blocks keep every actor busy


def import_ray():
    """`ray` with usage stats off, or a one-line UserError saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError(f"--backend ray needs Ray Data ({e}): pip install 'refine-llm[ray]' "
                        "(or pip install 'ray[data]>=2.60')") from None
    return ray


# ----------------------------------------------------------------------------- local cluster lifetime


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks (field 22 of /proc/pid/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _holders(session: Path) -> list[int]:
    """Our processes (same uid, not us) whose cwd or an open file lies inside ``session``."""
    prefix, me, uid, out = str(session), os.getpid(), os.getuid(), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            if p.stat().st_uid != uid:
                continue
            links = [os.readlink(p / "cwd")] + [os.readlink(f) for f in (p / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith(prefix) for link in links):
            out.append(int(p.name))
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def cleanup_stale_sessions(root: Path = SESSION_ROOT) -> list[int]:
    """Kill what is left of local clusters whose driver is gone (e.g. killed with SIGKILL); return the pids."""
    killed: list[int] = []
    if not root.is_dir() or not Path("/proc").is_dir():
        return killed
    for session in root.iterdir():
        try:
            owner = json.loads((session / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        if owner and _proc_start(int(owner["pid"])) == owner["start"]:
            continue  # a live driver (another job of ours): leave it alone
        pids = _holders(session)
        _kill(pids)
        killed += pids
        shutil.rmtree(session, ignore_errors=True)
    if killed:
        log.warning("killed %d processes left by a Ray driver that died (%s)", len(killed), root)
    return killed


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


@contextlib.contextmanager
def cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator:
    """Yield `ray`, connected: an already initialised session (tests, notebooks) as it is; ``address``
    (or ``$RAY_ADDRESS``) joined and left; otherwise a local cluster started and stopped here."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        import refine_llm

        try:
            ray.init(address=address, runtime_env={"py_modules": [refine_llm]}, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"--ray-address {address}: cannot join that Ray cluster ({str(e).splitlines()[0]}); "
                            "check `ray status` on its head node") from None
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    with local_cluster(num_cpus):
        yield ray


def job_cluster(address: str | None = None):
    """`ray`, connected for the rest of this process (the main job scores several question sets): the
    first call joins ``address`` / ``$RAY_ADDRESS`` or starts a local cluster, and it is left or stopped
    (with every process it started) when the process exits."""
    ray = import_ray()
    if not ray.is_initialized():
        cm = cluster(address)
        cm.__enter__()
        atexit.register(cm.__exit__, None, None, None)
    return ray


@contextlib.contextmanager
def local_cluster(num_cpus: int | None = None) -> Iterator[str]:
    """Start a local Ray cluster for this process (usage stats off, no dashboard) and stop it, leaving no
    process behind; yields its session directory. Cleans up sessions of dead drivers first."""
    ray = import_ray()
    cleanup_stale_sessions()
    session = SESSION_ROOT / str(os.getpid())
    shutil.rmtree(session, ignore_errors=True)
    session.mkdir(parents=True)
    (session / "owner.json").write_text(json.dumps({"pid": os.getpid(), "start": _proc_start(os.getpid())}))
    # Workers import this checkout of refine_llm (a local cluster shares our filesystem).
    root = str(Path(_package_dir()).parent)
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(session), log_to_driver=False,
                 object_store_memory=OBJECT_STORE_MB * 1024 ** 2, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0",
                                           "TOKENIZERS_PARALLELISM": "false"}})
        yield str(session)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        _kill(_holders(session))  # the per-node agents can outlive shutdown by a moment
        shutil.rmtree(session, ignore_errors=True)


# ----------------------------------------------------------------------------- actor pool


class _ScoreActor:
    """One scorer per actor: loads the model once, then scores one fixed batch per call."""

    def __init__(self, model_name: str, quant: str, device: str | None, trust_remote_code: bool, prompt,
                 cfg: dict, cpus: int, use_vllm: bool, vllm_dtype: str):
        import torch

        from refine_llm import models
        from refine_llm.config import ScoringConfig

        torch.set_num_threads(max(1, int(cpus)))  # what Ray granted us, not the node's core count
        cfg = ScoringConfig(**{**cfg, "backend": "vllm" if use_vllm else "hf"})
        if use_vllm:  # UNTESTED (no GPU here): one vLLM engine per actor, tensor parallel inside it
            from refine_llm.scoring.backends.vllm import VLLMBackend

            tokenizer = models.load_tokenizer(model_name, trust_remote_code=trust_remote_code)
            self.backend = VLLMBackend(models.model_dir(models.resolve(model_name)), tokenizer, prompt, cfg, vllm_dtype)
        else:
            from refine_llm.scoring.backends.hf import HFBackend

            model, tokenizer = models.load_model(model_name, quant=quant, device=device,
                                                 trust_remote_code=trust_remote_code)
            self.backend = HFBackend(model, tokenizer, prompt, cfg)

    def __call__(self, batch):
        """batch: pyarrow Table of fixed batches (columns "batch" + list columns of question fields)."""
        import pyarrow as pa

        from refine_llm.scoring.backends import score_payload

        return pa.concat_tables(list(score_payload(self.backend, batch)))


class RayPool:
    """Scores a payload of fixed batches (refine_llm.scoring.driver) on a Ray actor pool; yields result
    tables (cache columns + "batch") as actors finish them, in any order."""

    def __init__(self, model_name: str, quant: str, prompt, cfg, *, device: str | None = None,
                 trust_remote_code: bool = False, num_actors: int | None = None, cpus_per_actor: int = 1,
                 gpus_per_actor: float = 0, vllm_dtype: str = "float32"):
        self.model_name, self.quant, self.prompt, self.cfg = model_name, quant, prompt, cfg
        self.device, self.trust_remote_code = device, trust_remote_code
        self.num_actors, self.cpus, self.gpus, self.vllm_dtype = num_actors, cpus_per_actor, gpus_per_actor, vllm_dtype

    def actors(self, ray) -> int:
        if self.num_actors:
            return self.num_actors
        res = ray.cluster_resources()
        n = res.get("GPU", 0) // self.gpus if self.gpus else res.get("CPU", 1) // self.cpus
        return max(1, int(n))

    def __call__(self, payload) -> Iterator:
        import ray
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = False  # the driver keys results by question id
        ctx.enable_progress_bars = False
        n = min(self.actors(ray), payload.num_rows)  # no idle actors (each would load a model for nothing)
        per_block = max(1, min(BATCHES_PER_BLOCK, math.ceil(payload.num_rows / (2 * n))))
        blocks = [payload.slice(i, per_block) for i in range(0, payload.num_rows, per_block)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            _ScoreActor,
            fn_constructor_kwargs=dict(model_name=self.model_name, quant=self.quant, device=self.device,
                                       trust_remote_code=self.trust_remote_code, prompt=self.prompt,
                                       cfg=asdict(self.cfg), cpus=self.cpus, use_vllm=self.gpus > 0,
                                       vllm_dtype=self.vllm_dtype),
            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n),
            num_cpus=self.cpus, num_gpus=self.gpus or None,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
