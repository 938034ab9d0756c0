"""Scale-out with torch.distributed (spec and figures: docs/SCALING.md).

Two ways in, one code path:
  * `lowbitpack quantize ... --nproc N` / `api.quantize(nproc=N)`: `launch()` starts N local ranks with
    torchrun's own elastic launch API (`torch.distributed.launcher.api.elastic_launch`), each of which runs
    `api.quantize` again with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set;
  * `torchrun --nproc-per-node N -m lowbitpack.cli quantize ...` (or several nodes): the same environment.
`context_from_env()` turns that environment into a `DistContext` (process group: NCCL when the ranks calibrate
on CUDA, gloo otherwise; object collectives always go through a gloo group).

Stream quantize (RTN / NF4 / QA-LoRA, and the writing of calibrated results), `DistContext.write_artifact`:
  1. source shards (or, for fewer shards than ranks, tensors) are divided across ranks deterministically
     (greedy by bytes); each rank hashes and quantizes its tensors and writes the packed tensors into part
     files inside rank 0's temporary output directory (one output-shard's worth of memory at most);
  2. rank 0 replays the single-process order through `ArtifactWriter` with a planning shard writer (shapes
     only, no data): this gives the same shard boundaries, tensor records and manifest as a one-process run;
  3. the planned output shards are divided across ranks; each rank assembles its shards from the part files
     (kept tensors straight from the source) and saves them with the shard writer's own metadata;
  4. rank 0 renames them, writes the index and the manifest (`ArtifactWriter.finish`) and renames the
     directory into place (`io.atomic.atomic_dir`).
Every step ends with `agree()`, a collective that turns an error on any rank into the same error on all
ranks, so nobody waits forever and rank 0 removes the temporary directory: a failed rank fails the run and
leaves nothing at the target. The artifact is byte-identical to the single-process run (all files; the
manifest apart from `created_utc` and `timing`, which differ between any two runs).

Calibration (GPTQ; any scheme with `needs_calibration` that `flows.calibrate` drives), `CalibrationParallel`:
  * the calibration batches (the same `batch_size` chunks as one process) are dealt round-robin to ranks: each
    rank runs only its batches through each layer, so activations are bit-identical to one process;
  * per linear, Σ xxᵀ and the sequence count are all-reduced (sum), then normalised as in one process
    (H = 2/n Σ xxᵀ): only the fp32 summation order differs (measured in docs/SCALING.md);
  * the linears of a group (q,k,v / o / gate,up / down) are solved in parallel: whole linears per rank on CUDA
    (the column loop is launch-bound, so only whole linears overlap), output rows split across ranks on CPU
    (compute-bound; GPTQ treats rows independently, so a row block solved alone gives the same codes);
    results are exchanged so every rank continues with the same quantized layer.
  `LOWBITPACK_GPTQ_SPLIT=rows|linears` overrides the choice.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as tdist

from . import errors as _errors
from .errors import InputError, LowbitpackError, OptionError
from .io.writer import ShardWriter

SPLIT_ENV = "LOWBITPACK_GPTQ_SPLIT"
_ERR_FILE = "rank{}.error.json"
_TMP_FILE = "tmpdir.txt"
_CALL_FILE = "call.pkl"
_RESULT_FILE = "result.pkl"


class RankFailedError(LowbitpackError):
    """Another rank of a distributed run failed; this rank stopped with it."""


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_rank_zero() -> bool:
    """True outside distributed runs and on global rank 0 (CLI output is printed once)."""
    return os.environ.get("RANK", "0") == "0"


# --------------------------------------------------------------------------------------------------
# process group and error agreement


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    backend: str
    cpu_group: Any  # gloo group for object collectives (status, plans, records)
    device: str | None  # calibration device of this rank (cuda:<local rank> under NCCL)

    # -- collectives on Python objects --------------------------------------------------------------
    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    def agree(self, err: BaseException | None) -> None:
        """Collective: every rank reports its error or None; if any rank failed, every rank raises
        (the failing rank its own error, the others a RankFailedError naming it)."""
        payload = None if err is None else _describe(err, self.rank)
        reports = self.all_gather(payload)
        failed = [r for r in reports if r is not None]
        if not failed:
            return
        if err is not None:
            err._lbp_agreed = True  # type: ignore[attr-defined]
            raise err
        first = failed[0]
        e = RankFailedError(f"rank {first['rank']} of {self.world} failed: {first['message']}")
        e._lbp_agreed = True  # type: ignore[attr-defined]
        e.origin = first  # type: ignore[attr-defined]
        raise e

    def step(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on this rank, then `agree` on the outcome; returns fn's value."""
        err = None
        value = None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank by agree()
            err = e
        self.agree(err)
        return value

    def barrier(self) -> None:
        tdist.barrier(group=self.cpu_group)

    # -- flows ----------------------------------------------------------------------------------------
    def calibration(self) -> "CalibrationParallel":
        return CalibrationParallel(self)

    def write_artifact(self, src, out, scheme, **kw) -> dict[str, Any]:
        return stream_quantize(self, src, out, scheme, **kw)

    def check_output(self, out, force: bool) -> None:
        from .io.atomic import check_output
        self.step(lambda: check_output(out, force) if self.rank == 0 else None)


def _describe(err: BaseException, rank: int) -> dict[str, Any]:
    if isinstance(err, RankFailedError) and getattr(err, "origin", None):
        return err.origin  # the failing rank's own error, so the launcher reports it whichever file it reads
    return {"rank": rank, "type": type(err).__name__, "message": str(err),
            "lowbitpack": isinstance(err, LowbitpackError), "secondary": isinstance(err, RankFailedError)}


def context_from_env(device: str | None = None) -> DistContext | None:
    """The DistContext of this process when it is one rank of several (torchrun / --nproc), else None.

    Initialises the default process group from the environment if nobody has yet: NCCL when CUDA is present
    and the calibration device is (or defaults to) CUDA, gloo otherwise.
    """
    if not tdist.is_available():
        return None
    if tdist.is_initialized():
        world = tdist.get_world_size()
        if world <= 1:
            return None
        backend = str(tdist.get_backend())
    else:
        world = env_world_size()
        if world <= 1:
            return None
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    rank = tdist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    cpu_group = tdist.new_group(backend="gloo") if backend != "gloo" else tdist.group.WORLD
    dev = device
    if backend == "nccl" and (device is None or device == "cuda"):
        dev = f"cuda:{local_rank}"
    return DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend, cpu_group=cpu_group,
                       device=dev)


# --------------------------------------------------------------------------------------------------
# launcher: N local ranks through torchrun's elastic launch API


def launch(nproc: int, target: str, *args: Any) -> Any:
    """Run `target(*args)` (`"module:function"`) in `nproc` local ranks started by torchrun's elastic launch API
    (fresh `python -m lowbitpack.dist` processes with RANK / WORLD_SIZE / MASTER_ADDR ... set as torchrun sets
    them; no `if __name__ == "__main__"` guard needed in the caller). Returns rank 0's value. If any rank
    fails, raises that rank's error (LowbitpackError types are kept) after every rank has stopped, and removes
    a temporary output directory a killed rank 0 could not remove."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise OptionError(f"--nproc must be a positive integer, got {nproc!r}", None, "e.g. --nproc 2")
    if env_world_size() > 1:
        raise OptionError("--nproc was given inside a distributed run (WORLD_SIZE is set)", None,
                          "drop --nproc when launching with torchrun")
    errdir = Path(tempfile.mkdtemp(prefix="lowbitpack-dist-"))  # private (0700): call, result, error files
    (errdir / _CALL_FILE).write_bytes(pickle.dumps((target, args, list(sys.path))))
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                       start_method="spawn")
    quiet = [] if os.environ.get("LOWBITPACK_DIST_DEBUG") else [  # one-line errors; the debug env shows all
        logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.launcher")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        try:
            elastic_launch(cfg, sys.executable)("-m", "lowbitpack.dist", str(errdir))
        except ChildFailedError:
            _remove_left_tmp(errdir)
            raise _error_from_files(errdir, nproc) from None
        return pickle.loads((errdir / _RESULT_FILE).read_bytes())
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
        shutil.rmtree(errdir, ignore_errors=True)


def _worker_main(errdir: str) -> None:
    """`python -m lowbitpack.dist ERRDIR`: one launched rank."""
    target, args, path = pickle.loads(Path(errdir, _CALL_FILE).read_bytes())
    sys.path[:0] = [p for p in path if p not in sys.path]
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    value = _rank_main(fn, args, errdir)
    if os.environ.get("RANK", "0") == "0":
        Path(errdir, _RESULT_FILE).write_bytes(pickle.dumps(value))


def _rank_main(fn: Callable[..., Any], args: tuple, errdir: str) -> Any:
    """Run one rank: threads split between local ranks, errors written for the launcher."""
    signal.signal(signal.SIGTERM, _sigterm)  # a killed rank unwinds, so rank 0 removes its temp directory
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    os.environ["LOWBITPACK_DIST_ERRDIR"] = errdir
    rank = int(os.environ.get("RANK", "0"))
    try:
        value = fn(*args)
        if tdist.is_initialized():
            tdist.barrier()  # nobody exits while another rank still reads from it
        return value
    except BaseException as e:
        with contextlib.suppress(OSError):
            Path(errdir, _ERR_FILE.format(rank)).write_text(json.dumps(_describe(e, rank)))
        raise


def _sigterm(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)


def _remove_left_tmp(errdir: Path) -> None:
    f = errdir / _TMP_FILE
    if f.is_file():
        tmp = Path(f.read_text().strip())
        if tmp.name.endswith(".partial") and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _error_from_files(errdir: Path, nproc: int) -> Exception:
    reports = []
    for r in range(nproc):
        f = errdir / _ERR_FILE.format(r)
        if f.is_file():
            with contextlib.suppress(ValueError, OSError):
                reports.append(json.loads(f.read_text()))
    primary = [r for r in reports if not r.get("secondary") and r["type"] not in ("SystemExit",)]
    if not primary:
        return RankFailedError(f"a rank of {nproc} died without an error message (killed, or out of memory?)",
                               None, "re-run with --nproc 1, or check memory per rank in docs/SCALING.md")
    rep = primary[0]
    cls = getattr(_errors, rep["type"], None)
    if rep["lowbitpack"] and isinstance(cls, type) and issubclass(cls, LowbitpackError):
        e = cls.__new__(cls)
        Exception.__init__(e, rep["message"])
        e.path, e.hint = None, None
        return e
    return RuntimeError(f"rank {rep['rank']} failed: {rep['type']}: {rep['message']}")


def launch_quantize(nproc: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`api.quantize(**kwargs)` in `nproc` local ranks; returns the manifest."""
    return launch(nproc, "lowbitpack.dist:_quantize_rank", kwargs)


def _quantize_rank(kwargs: dict[str, Any]) -> dict[str, Any]:
    from . import api
    kwargs = dict(kwargs)
    if os.environ.get("RANK", "0") != "0":
        kwargs["progress"] = False
    return api.quantize(**kwargs)


# --------------------------------------------------------------------------------------------------
# stream quantize: divided reading/quantizing/writing, byte-identical output


def _assign(order: list[tuple[str, str]], nbytes: Mapping[str, int], shards: list[str], world: int) -> dict[str, int]:
    """tensor name -> rank. Whole source shards when there are at least as many as ranks, else tensors;
    greedy by bytes (largest first, ties by position), so every rank computes the same assignment."""
    if len(shards) >= world:
        size = {s: 0 for s in shards}
        for s, n in order:
            size[s] += nbytes[n]
        owner_of_shard = _greedy([(s, size[s]) for s in shards], world)
        return {n: owner_of_shard[s] for s, n in order}
    return _greedy([(n, nbytes[n]) for _, n in order], world)


def _greedy(items: list[tuple[str, int]], world: int) -> dict[str, int]:
    load = [0] * world
    owner = {}
    for i, (key, cost) in sorted(enumerate(items), key=lambda t: (-t[1][1], t[0])):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[key] = r
        load[r] += cost
    return owner


class _PartWriter:
    """A rank's packed tensors, flushed into hidden part files of the temporary output directory."""

    def __init__(self, directory: Path, rank: int, max_bytes: int):
        self.dir, self.rank, self.max_bytes = directory, rank, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.files: list[Path] = []
        self.location: dict[str, str] = {}

    def _current(self) -> str:
        return f".rank{self.rank:05d}-{len(self.files):05d}.part.safetensors"

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max_bytes:
            self.flush()
        self.buf[name] = t.detach().contiguous().cpu()
        self.buf_bytes += n
        self.location[name] = self._current()

    def flush(self) -> None:
        from safetensors.torch import save_file
        if not self.buf:
            return
        f = self.dir / self._current()
        save_file(self.buf, str(f))
        self.files.append(f)
        self.buf, self.buf_bytes = {}, 0


def _tensor_order(ckpt) -> list[tuple[str, str]]:
    """(shard, name) in the order the single-process flow meets them (shard order, then each shard's keys)."""
    from safetensors import safe_open
    order = []
    for s in ckpt.shards:
        try:
            with safe_open(str(ckpt.path / s), framework="pt") as f:
                order.extend((s, n) for n in f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise InputError(f"cannot read tensors ({e.__class__.__name__}: {e})", ckpt.path / s,
                             "the file is corrupt or truncated; re-download it") from None
    return order


def _read(file: Path, names: list[str]):
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            for n in names:
                yield n, f.get_tensor(n)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read tensors ({e.__class__.__name__}: {e})", file,
                         "the file is corrupt or truncated; re-download it") from None


def stream_quantize(ctx: DistContext, src, out, scheme, *, modules: str | None = None, force: bool = False,
                    show_progress: bool = True, max_shard_bytes: int = 2 * 1024**3,
                    precomputed: Mapping[str, Any] | None = None,
                    extra_quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """`flows.quantize.quantize_checkpoint` divided across the ranks of `ctx`; same artifact bytes.
    Every rank calls it; every rank returns the manifest."""
    t0 = time.perf_counter()
    state: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            ctx.step(lambda: _open_source(state, src, out, modules, force, ctx.rank))
            tmp = ctx.step(lambda: _enter_tmp(stack, out, force) if ctx.rank == 0 else None)
            tmp = Path(ctx.broadcast(str(tmp) if tmp is not None else None))
            records = ctx.step(lambda: _phase_quantize(ctx, state, tmp, scheme, precomputed, max_shard_bytes,
                                                       show_progress))
            gathered = ctx.all_gather(records)
            plan = ctx.step(lambda: _plan(state, tmp, scheme, gathered, max_shard_bytes, extra_quantization)
                            if ctx.rank == 0 else None)
            plan = ctx.broadcast(plan)
            ctx.step(lambda: _phase_write(ctx, state, plan, gathered))
            ctx.step(lambda: [f.unlink() for f in records["part_files"]])
            manifest = ctx.step(lambda: _finish(state, t0) if ctx.rank == 0 else None)
    except BaseException as e:
        if getattr(e, "_lbp_agreed", False):
            raise
        final_err: BaseException | None = e  # only rank 0 can fail here: the rename into place
    else:
        final_err = None
    ctx.agree(final_err)
    return ctx.broadcast(manifest)


def _open_source(state: dict, src, out, modules, force, rank) -> None:
    from .flows.select import compile_modules, is_selected
    from .io.atomic import check_output
    from .io.checkpoint import SourceCheckpoint
    from .flows.quantize import _nbytes
    if rank == 0:
        check_output(out, force)
    ckpt = SourceCheckpoint.open(src)
    pattern = compile_modules(modules)
    infos = ckpt.tensor_infos()
    order = _tensor_order(ckpt)
    selected = {n for _, n in order if is_selected(n, infos[n]["shape"], infos[n]["dtype"], pattern)}
    if not selected:
        raise InputError(f"no tensor matches the module pattern {pattern.pattern!r}", ckpt.path,
                         "check --modules against `lowbitpack inspect` of the source")
    state.update(ckpt=ckpt, pattern=pattern, infos=infos, order=order, selected=selected,
                 nbytes={n: _nbytes(infos[n]) for _, n in order})


def _enter_tmp(stack: contextlib.ExitStack, out, force) -> Path:
    from .io.atomic import atomic_dir
    tmp = stack.enter_context(atomic_dir(out, force))
    errdir = os.environ.get("LOWBITPACK_DIST_ERRDIR")
    if errdir:  # the launcher removes it if this rank is killed before it can
        with contextlib.suppress(OSError):
            Path(errdir, _TMP_FILE).write_text(str(tmp))
    return tmp


def _phase_quantize(ctx: DistContext, state: dict, tmp: Path, scheme, precomputed, max_shard_bytes: int,
                    show_progress: bool) -> dict[str, Any]:
    """This rank's tensors: sha256, quantize (or take the calibrated result), packed tensors to part files;
    this rank's share of the source shard hashes."""
    from .flows.progress import progress_bar
    from .flows.quantize import _quantize_one
    from .io.hashing import sha256_file, sha256_tensor
    ckpt, order, nbytes = state["ckpt"], state["order"], state["nbytes"]
    owner = _assign(order, nbytes, ckpt.shards, ctx.world)
    mine: dict[str, list[str]] = {}
    for s, n in order:
        if owner[n] == ctx.rank:
            mine.setdefault(s, []).append(n)
    part = _PartWriter(tmp, ctx.rank, max_shard_bytes)
    tensors: dict[str, dict[str, Any]] = {}
    with progress_bar(show_progress and ctx.rank == 0) as bar:
        task = bar.add_task(f"quantize {scheme.name} (rank 0 of {ctx.world})",
                            total=sum(nbytes[n] for ns in mine.values() for n in ns))
        for shard, names in mine.items():
            for name, t in _read(ckpt.path / shard, names):
                sha = sha256_tensor(t)
                if name in state["selected"]:
                    qt = precomputed.get(name) if precomputed is not None else None
                    if qt is None:
                        qt = _quantize_one(scheme, name, t, ckpt.path / shard)
                    keys = {}
                    for key, qtt in qt.tensors.items():
                        part.add(f"{name}.{key}", qtt)
                        keys[key] = (str(qtt.dtype).removeprefix("torch."), list(qtt.shape))
                    tensors[name] = {"kind": "q", "sha256": sha, "scheme": qt.scheme, "layout": qt.layout,
                                     "bits": qt.bits, "group_size": qt.group_size, "shape": list(qt.shape),
                                     "dtype": str(qt.dtype).removeprefix("torch."), "params": qt.params,
                                     "keys": keys}
                else:
                    tensors[name] = {"kind": "kept", "sha256": sha, "shard": shard,
                                     "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                bar.advance(task, nbytes[name])
                del t
    part.flush()
    shard_sha = {s: sha256_file(ckpt.path / s) for i, s in enumerate(ckpt.shards) if i % ctx.world == ctx.rank}
    return {"tensors": tensors, "location": part.location, "part_files": part.files, "shard_sha": shard_sha}


def _plan(state: dict, tmp: Path, scheme, gathered: list[dict], max_shard_bytes: int,
          extra_quantization: dict[str, Any] | None) -> list[tuple[str, list[str]]]:
    """Replay the single-process order through ArtifactWriter with a shapes-only shard writer."""
    from .artifact import SHARD_PREFIX, ArtifactWriter, dtype_from_name
    from .qtensor import QuantizedTensor
    ckpt = state["ckpt"]
    recs: dict[str, dict] = {}
    shard_sha: dict[str, str] = {}
    for g in gathered:
        recs.update(g["tensors"])
        shard_sha.update(g["shard_sha"])
    source = {**ckpt.source_identity(), "path": str(ckpt.path.resolve()),
              "shards": {s: shard_sha[s] for s in ckpt.shards}}
    quant_cfg = {**scheme.config(), "modules": state["pattern"].pattern, **(extra_quantization or {})}
    writer = ArtifactWriter(tmp, source, quant_cfg, max_shard_bytes)
    planned = _PlannedShardWriter(tmp, SHARD_PREFIX, max_shard_bytes, metadata=writer.writer.metadata)
    writer.writer = planned

    def meta(dtype: str, shape: list[int]) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype_from_name(dtype), device="meta")

    for _, name in state["order"]:
        r = recs[name]
        if r["kind"] == "q":
            qt = QuantizedTensor(scheme=r["scheme"], layout=r["layout"], bits=r["bits"], group_size=r["group_size"],
                                 shape=tuple(r["shape"]), dtype=dtype_from_name(r["dtype"]),
                                 tensors={k: meta(d, s) for k, (d, s) in r["keys"].items()}, params=r["params"])
            writer.add_quantized(name, qt, r["sha256"])
        else:
            writer.add_kept(name, meta(r["dtype"], r["shape"]), r["sha256"])
    planned.flush()
    state["writer"] = writer
    return [(str(f), names) for f, names in planned._tmp_files]


def _phase_write(ctx: DistContext, state: dict, plan: list[tuple[str, list[str]]], gathered: list[dict]) -> None:
    """Assemble and save this rank's planned output shards (round-robin), exactly as ShardWriter would."""
    from safetensors.torch import save_file
    ckpt = state["ckpt"]
    location: dict[str, str] = {}
    kept_shard: dict[str, str] = {}
    for g in gathered:
        location.update(g["location"])
        kept_shard.update({n: r["shard"] for n, r in g["tensors"].items() if r["kind"] == "kept"})
    metadata = ShardWriter(ckpt.path).metadata
    for i, (path, names) in enumerate(plan):
        if i % ctx.world != ctx.rank:
            continue
        tmp = Path(path)
        by_file: dict[Path, list[str]] = {}
        for n in names:
            f = tmp.parent / location[n] if n in location else ckpt.path / kept_shard[n]
            by_file.setdefault(f, []).append(n)
        got: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            got.update(_read(f, ns))
        save_file({n: got[n] for n in names}, str(tmp), metadata=metadata)
        del got


def _finish(state: dict, t0: float) -> dict[str, Any]:
    writer = state["writer"]
    writer.copy_sidecars(state["ckpt"].path)
    return writer.finish({"timing": {"seconds": round(time.perf_counter() - t0, 3)}})


class _PlannedShardWriter(ShardWriter):
    """ShardWriter's flush policy on shapes only: records which tensors go into which shard. The shard files
    are then written by the ranks (`_phase_write`); `finish()` is ShardWriter's (rename, hash, index)."""

    def _store(self, tensor: torch.Tensor, nbytes: int) -> None:
        return None

    def _write_shard(self, f: Path) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# calibration: data-parallel Hessians, linears (or rows) of a group solved in parallel


class CalibrationParallel:
    """Hooks `flows.calibrate.calibrated_quantize` calls when given `parallel=`."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.split = os.environ.get(SPLIT_ENV, "auto")
        if self.split not in ("auto", "rows", "linears"):
            raise OptionError(f"{SPLIT_ENV}={self.split!r} is not one of auto, rows, linears", None,
                              f"unset {SPLIT_ENV} or set it to rows or linears")
        self.solve_seconds = 0.0

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world

    def check_batches(self, samples: int, batch_size: int) -> None:
        n = -(-samples // batch_size)
        if n < self.world:
            raise OptionError(f"{samples} calibration samples make {n} batches of {batch_size}, fewer than the "
                              f"{self.world} ranks", None,
                              f"raise --calib-samples to at least {self.world * batch_size} or lower --nproc")

    def owns_batch(self, index: int) -> bool:
        return index % self.world == self.rank

    def reduce(self, acc) -> None:
        """Sum Σ xxᵀ and the sequence count over ranks (in place): `acc.hessian()` is then the global one."""
        tdist.all_reduce(acc.sum)
        n = torch.tensor([float(acc.n)], dtype=torch.float64, device=acc.sum.device)
        tdist.all_reduce(n)
        acc.n = int(n.item())

    def hessian(self, acc) -> torch.Tensor:
        self.reduce(acc)
        return acc.hessian()

    def _mode(self, scheme, group: list[str], dev: torch.device, shapes: dict[str, tuple[int, int]]) -> str:
        from .schemes.gptq import GPTQ
        if self.split != "auto":
            mode = self.split
        elif dev.type != "cuda":
            mode = "rows"  # CPU: compute-bound, row blocks divide the work evenly
        else:  # CUDA: the per-column cost does not divide by rows, the matmul cost does (docs/SCALING.md)
            mode = "rows" if solve_time(shapes, group, self.world, "rows") < solve_time(
                shapes, group, self.world, "linears") else "linears"
        if mode == "rows" and (not isinstance(scheme, GPTQ) or min(shapes[n][0] for n in group) < self.world):
            mode = "linears"  # row blocks are exact for GPTQ's row-independent solve only
        return mode

    def solve_group(self, scheme, ckpt, prefix: str, group: list[str], accs: dict, dev: torch.device,
                    shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[Any, dict]]:
        """Quantize the group's linears with their global Hessians; every rank returns every result."""
        from .flows.calibrate import _quantize_with_hessian, _read_tensors
        for n in group:
            self.reduce(accs[n])
        mode = self._mode(scheme, group, dev, shapes)
        t0 = time.perf_counter()

        def work() -> dict[str, tuple[Any, dict]]:
            mine: dict[str, tuple[Any, dict]] = {}
            if mode == "linears":
                owner = _greedy([(n, int(1e6 * solve_time(shapes, [n], 1, "linears"))) for n in group], self.world)
                names = [n for n in group if owner[n] == self.rank]
            else:
                names = list(group)
            for n in names:
                name = f"{prefix}{n}.weight"
                if accs[n].n == 0:
                    raise InputError(f"{name} never ran during calibration", ckpt.path, "exclude it with --modules")
                w = _read_tensors(ckpt, [name])[name]
                if not torch.isfinite(w).all():
                    raise InputError(f"tensor {name} holds NaN or Inf values", ckpt.path,
                                     "fix the checkpoint, or exclude the tensor with --modules")
                if mode == "rows":
                    rows = _row_block(w.shape[0], self.rank, self.world)
                    w = w[rows[0]:rows[1]]
                qt, st = _quantize_with_hessian(scheme, w.to(dev), accs[n].hessian())
                qt.tensors = {k: v.cpu() for k, v in qt.tensors.items()}
                mine[n] = (qt, st)
            return mine

        mine = self.ctx.step(work)
        parts = self.ctx.all_gather(mine)
        self.solve_seconds += time.perf_counter() - t0
        solved: dict[str, tuple[Any, dict]] = {}
        for n in group:
            if mode == "rows":
                qt, st = cat_row_blocks([p[n] for p in parts], shapes[n])
            else:
                qt, st = next(p[n] for p in parts if n in p)
            qt.tensors = {k: v.to(dev) for k, v in qt.tensors.items()}
            solved[n] = (qt, st)
        return solved


# GPTQ solve time of one linear on one H100, fitted to bench/results/gptq_speed-cuda.json (14 linears, within
# 10-20%): T(out, in) = C_COL·in + C_MM·out·in² (+ in³ / CHOL_FLOPS for the Cholesky factorisations, assumed).
C_COL = 1.42e-4  # s per input column: the column loop's launch-bound kernels
C_MM = 9.8e-13   # s per out·in²: the lazy-batch matmuls
CHOL_FLOPS = 20e12


def solve_time(shapes: dict[str, tuple[int, int]], group: list[str], world: int, mode: str) -> float:
    """Modelled wall time of a group's GPTQ solve on `world` GPUs: whole linears per rank (greedy), or every
    linear's rows split (per-column cost paid by every rank, matmul cost divided)."""
    def t(o: int, i: int, rows_div: int = 1) -> float:
        return C_COL * i + C_MM * o * i * i / rows_div + i**3 / CHOL_FLOPS
    if mode == "rows":
        return sum(t(*shapes[n], world) for n in group)
    owner = _greedy([(n, int(1e6 * t(*shapes[n]))) for n in group], world)
    return max(sum(t(*shapes[n]) for n in group if owner[n] == r) for r in range(world))


def _row_block(rows: int, rank: int, world: int) -> tuple[int, int]:
    per, extra = divmod(rows, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def cat_row_blocks(blocks: list[tuple[Any, dict]], shape: tuple[int, int]) -> tuple[Any, dict]:
    """One intg-v1 QuantizedTensor from the QuantizedTensors of consecutive row blocks of a weight: every
    stored tensor is per output row except `g_idx` (per input column, equal in every block)."""
    from .qtensor import QuantizedTensor
    first = blocks[0][0]
    tensors = {}
    for k, t in first.tensors.items():
        if k == "g_idx":
            tensors[k] = t
        else:
            tensors[k] = torch.cat([b[0].tensors[k] for b in blocks if b[0].tensors[k].shape[0] > 0], dim=0)
    qt = QuantizedTensor(scheme=first.scheme, layout=first.layout, bits=first.bits, group_size=first.group_size,
                         shape=tuple(shape), dtype=first.dtype, tensors=tensors, params=first.params)
    st = dict(blocks[0][1])
    if "loss" in st:
        st["loss"] = sum(b[1].get("loss", 0.0) for b in blocks)
    if "damp" in st:
        st["damp"] = max(b[1].get("damp", 0.0) for b in blocks)
    return qt, st


def _main(errdir: str) -> None:
    # os._exit: no interpreter teardown of the process group's threads (an abort there would fail a good run)
    code = 0
    try:
        _worker_main(errdir)
    except BaseException:  # noqa: BLE001 - reported to the launcher through the error file
        code = 1
        if os.environ.get("LOWBITPACK_DIST_DEBUG"):
            import traceback
            traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # `python -m lowbitpack.dist`: run the imported module's code, so that its classes
    from lowbitpack.dist import _main as _imported_main  # (RankFailedError) are the ones the flows raise
    _imported_main(sys.argv[1])
