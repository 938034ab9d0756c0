"""Model card generation and `push`: upload a directory to the Hugging Face Hub in one commit.

The card's YAML says what the repo is relative to its base (`base_model_relation`: adapter for adapter
bundles, merge for merged/restored models, quantized for artifacts and quantized exports), which library
loads it, tags with the scheme and bit width, and the license when the source declares one. The body says
what it is, how to load it, and where it came from (a provenance table read from the lowbitpack manifests
present in the directory: lowbitpack.json, lowbitpack_export.json, bundle/merge manifests, adapter_config.json).

Upload: `HfApi.create_repo(exist_ok=True)`, then a single `create_commit` with a `CommitOperationAdd` per
file, so the repo never shows a half-uploaded state; huggingface_hub sends large files through Xet or LFS
before the commit. The token is passed to huggingface_hub only; it is never printed, logged or returned.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError, LowbitpackError, OptionError
from .version import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}


class HubError(LowbitpackError):
    """The Hub (or the endpoint given) refused or failed a request."""


@dataclass
class RepoDescription:
    kind: str                                  # artifact | bundle | merge | export | checkpoint
    target: str | None = None                  # export format: hf, compressed-tensors, gguf, bnb-nf4, gptq ...
    base_model: str | None = None
    base_revision: str | None = None
    relation: str | None = None                # adapter | merge | quantized | None
    library: str = "transformers"
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    provenance: list[tuple[str, str]] = field(default_factory=list)
    exactness: str | None = None


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _find_key(obj: Any, key: str, depth: int = 0) -> Any:
    """First value of `key` in a nested manifest (breadth-first, shallow first)."""
    if depth > 4:
        return None
    if isinstance(obj, dict):
        if obj.get(key) not in (None, ""):
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key, depth + 1)
            if found not in (None, ""):
                return found
    return None


def hub_id(value: Any) -> str | None:
    """`value` if it is a Hub repo id ("org/name") and not an existing local path, else None."""
    return value if isinstance(value, str) and _HUB_ID.match(value) and not Path(value).exists() else None


def _license_from_readme(path: Path) -> str | None:
    readme = path / "README.md"
    if not readme.is_file():
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    if m:
        lic = re.search(r"^license:\s*([^\s#]+)", m.group(1), re.M)
        if lic:
            return lic.group(1).strip("'\"")
    return None


def _license_from_dir(path: Path) -> str | None:
    """The license a local artifact or checkpoint directory records (manifest, source marker, README)."""
    art = _read_json(path / "lowbitpack.json") or {}
    marker = _read_json(path / "lowbitpack_source.json") or {}
    lic = (art.get("source") or {}).get("license") if isinstance(art.get("source"), dict) else None
    return lic or marker.get("license") or _license_from_readme(path)


def describe(path: str | Path) -> RepoDescription:
    """Read the manifests in `path` and say what the directory is.

    Priority: a merge manifest (lowbitpack_merge.json: PLR restore, possibly exported) > an adapter bundle
    (lowbitpack_bundle.json / adapter_config.json) > an artifact (lowbitpack.json) > an export
    (lowbitpack_export.json) > a plain checkpoint (config.json, lowbitpack_source.json).
    """
    path = Path(path)
    d = RepoDescription(kind="checkpoint")
    manifests = {f.name: m for f in sorted(path.glob("lowbitpack*.json")) if (m := _read_json(f)) is not None}
    artifact = manifests.get("lowbitpack.json")
    export = manifests.get("lowbitpack_export.json")
    source_marker = manifests.get("lowbitpack_source.json")
    bundle = next((m for n, m in manifests.items() if "bundle" in str(m.get("format", "")) or "bundle" in n), None)
    merge = next((m for n, m in manifests.items() if "merge" in str(m.get("format", "")) or "merge" in n), None)
    adapter_cfg = _read_json(path / "adapter_config.json")
    config = _read_json(path / "config.json") or {}
    quant: dict[str, Any] = {}
    if export is not None:
        inp = export.get("input", {})
        # an export of a merged checkpoint carries the merge manifest in its provenance
        merge = merge or next((m for m in (inp.get("manifests") or {}).values()
                               if "merge" in str(m.get("format", ""))), None)
        d.target = export.get("target")
        d.base_model = hub_id(_find_key(inp.get("source"), "model_id"))
        d.base_revision = (inp.get("source") or {}).get("revision")
        quant = inp.get("quantization") or {}
        report = export.get("report") or {}
        if "exact" in report:
            d.exactness = ("exact (codes and scales carried over bit for bit)" if report["exact"]
                           else f"max abs weight error {report.get('max_abs_error', '?')}")
        elif "errors" in report:
            d.exactness = "; ".join(f"{k}: max abs error {v.get('max_abs_error', 0):.3g}"
                                    for k, v in report["errors"].items())
    if merge is not None:
        r = merge.get("restore") or {}
        orig, trained = merge.get("original") or {}, merge.get("trained_on") or {}
        d.kind = "merge"
        d.base_model = hub_id(orig.get("model_id")) or hub_id(trained.get("model_id")) or d.base_model \
            or hub_id(_find_key(merge, "model_id"))
        d.base_revision = orig.get("revision") or d.base_revision
        merged = bool(r.get("merged", True))
        # folded (or 16-bit) restores are merges; a restored base with the adapter kept beside it is a quantized base
        d.relation = "merge" if merged or not r.get("bits") or r.get("bits") == 16 else "quantized"
        if not merged and adapter_cfg is not None:
            d.tags += ["peft", "lora"]
        d.tags += ["plr"] + ([f"restore-{r['bits']}"] if r.get("bits") else [])
        if r.get("scheme") and r["scheme"] != "none":
            quant = quant or {"scheme": r["scheme"], "bits": r.get("bits")}
        if r.get("format") and r["format"] not in ("ours", "hf"):
            d.target = d.target or r["format"]
        if r.get("format") == "ours" and artifact is not None:
            d.library = "lowbitpack"
            quant = artifact.get("quantization") or quant
    elif adapter_cfg is not None or bundle is not None:
        d.kind, d.relation, d.library = "bundle", "adapter", "peft"
        d.base_model = (hub_id(_find_key(bundle, "model_id"))
                        or hub_id((adapter_cfg or {}).get("base_model_name_or_path")))
        quant = (bundle or {}).get("quantization") or _find_key(bundle, "quantization") or {}
        d.tags += ["peft", "lora"]
        if adapter_cfg and adapter_cfg.get("peft_type"):
            d.tags.append(str(adapter_cfg["peft_type"]).lower())
    elif artifact is not None:
        d.kind, d.relation, d.library = "artifact", "quantized", "lowbitpack"
        d.base_model = hub_id((artifact.get("source") or {}).get("model_id"))
        d.base_revision = (artifact.get("source") or {}).get("revision")
        quant = artifact.get("quantization") or {}
    elif export is not None:
        d.kind = "export"
        d.relation = "quantized" if (quant or d.target != "hf") else None
    if d.base_model is None and source_marker is not None:
        d.base_model = hub_id(source_marker.get("model_id"))
    qc = config.get("quantization_config") or {}
    if d.kind == "checkpoint" and qc:
        d.relation = "quantized"
    if qc.get("quant_method"):
        d.tags.append(str(qc["quant_method"]))
        if d.target is None and qc["quant_method"] in ("bitsandbytes", "gptq", "compressed-tensors"):
            d.target = qc["quant_method"]
    if any(path.glob("*.gguf")):
        d.tags.append("gguf")
        d.target = d.target or "gguf"
    if d.target and d.target not in d.tags:
        d.tags.append(d.target)
    scheme, bits = quant.get("scheme"), quant.get("bits")
    if not bits and isinstance(scheme, str) and (mb := re.search(r"[a-z](\d+)$", scheme)):
        bits = int(mb.group(1))  # nf4, int8, gptq3 ...: the width is in the name (imported artifacts omit it)
    if scheme:
        d.tags.append(str(scheme))
    if isinstance(bits, (int, float)) and not isinstance(bits, bool) and bits:
        d.tags.append(f"{bits:g}-bit")
    d.license = ((artifact or {}).get("source") or {}).get("license") or _find_key(export, "license") \
        or (source_marker or {}).get("license") or _license_from_readme(path)
    if d.license is None:
        src_path = _find_key(artifact or export or {}, "path")
        if isinstance(src_path, str) and Path(src_path).is_dir():
            d.license = _license_from_readme(Path(src_path))
    if d.license is None and bundle is not None:  # a bundle records where its base artifact and source live
        base = bundle.get("base") if isinstance(bundle.get("base"), dict) else {}
        for cand in ((base.get("artifact") or {}).get("path"), base.get("source_path")):
            if d.license is None and isinstance(cand, str) and Path(cand).is_dir():
                d.license = _license_from_dir(Path(cand))
    d.tags = list(dict.fromkeys(["lowbitpack", *d.tags]))
    rows: list[tuple[str, str]] = []
    if d.base_model or d.base_revision:
        rows.append(("base model", f"{d.base_model or 'local'}" + (f" @ {d.base_revision}" if d.base_revision else "")))
    if scheme:
        rows.append(("quantization", ", ".join(f"{k}={quant[k]}" for k in ("scheme", "bits", "group_size")
                                               if quant.get(k) is not None)))
    if merge is not None and merge.get("restore"):
        r = merge["restore"]
        rows.append(("restore", f"PLR-{r.get('bits')} ({r.get('scheme')}), adapter "
                                + ("folded" if r.get("fold") else "merged" if r.get("merged") else "kept")))
        if (merge.get("bundle") or {}).get("id"):
            rows.append(("adapter bundle", str(merge["bundle"]["id"])[:16]))
    if d.target:
        rows.append(("format", d.target))
    if d.exactness:
        rows.append(("export fidelity", d.exactness))
    for m in (artifact, export, bundle, merge):
        if m and m.get("producer"):
            p = m["producer"]
            rows.append(("produced by", f"{p.get('name', 'lowbitpack')} {p.get('version', '')}".strip()))
            break
    created = _find_key(export or artifact or bundle or merge or {}, "created_utc")
    if created:
        rows.append(("created (UTC)", str(created)))
    d.provenance = rows
    return d


def _load_snippet(d: RepoDescription, repo_id: str) -> str:
    if d.kind == "bundle":
        base = d.base_model or "<base model>"
        return (f"```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
                f"model = PeftModel.from_pretrained(base, \"{repo_id}\")\n```\n\n"
                "The adapter was trained on a quantized base; `lowbitpack merge` restores the base to 16/8/4 bits "
                "(Post-LoRA Restoration) and folds or keeps the adapter.")
    if d.kind == "artifact":
        return (f"```bash\npip install lowbitpack\nhf download {repo_id} --local-dir packed\n"
                "lowbitpack inspect packed\nlowbitpack export packed --format hf -o dense   # or gguf, "
                "compressed-tensors, bnb-nf4, gptq\n```\n\n```python\nfrom lowbitpack.modeling import "
                "load_dequantized_model\nmodel = load_dequantized_model(\"packed\")\n```")
    if d.target == "gguf":
        return (f"```bash\nllama-cli -hf {repo_id}\n```\n\n```python\nfrom transformers import "
                f"AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo_id}\", "
                "gguf_file=\"<file>.gguf\")\n```")
    if d.target == "compressed-tensors":
        return (f"```python\nfrom vllm import LLM\nllm = LLM(\"{repo_id}\")\n```\n\n```python\n"
                "from transformers import AutoModelForCausalLM\nfrom transformers.utils.quantization_config import "
                f"CompressedTensorsConfig\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo_id}\", "
                "quantization_config=CompressedTensorsConfig(dequantize=True))\n```")
    extra = {"gptq": "  # needs gptqmodel + optimum", "bitsandbytes": "  # needs bitsandbytes",
             "bnb-nf4": "  # needs bitsandbytes", "bnb-int8": "  # needs bitsandbytes"}.get(d.target or "", "")
    return (f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\"){extra}\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")\n```")


def _what(d: RepoDescription) -> str:
    base = f"[{d.base_model}](https://huggingface.co/{d.base_model})" if d.base_model else "its base model"
    if d.kind == "bundle":
        return (f"A LoRA adapter bundle for {base}, with the quantization it was trained on and the base's "
                "tensor hashes.")
    if d.kind == "artifact":
        return f"A packed low-bit lowbitpack artifact of {base} (format v1): packed codes, scales and kept tensors."
    if d.kind == "merge" or d.relation == "merge":
        return f"{base} with a LoRA adapter merged in after restoring the base (Post-LoRA Restoration)."
    if d.target:
        return f"{base} exported by lowbitpack to the `{d.target}` format."
    return f"A model derived from {base} with lowbitpack."


def build_card(path: str | Path, repo_id: str, *, license: str | None = None,
               files: list[tuple[str, int]] | None = None) -> str:
    """README.md text (YAML metadata + body) for the directory `path` pushed as `repo_id`."""
    from huggingface_hub import ModelCardData

    d = describe(path)
    meta: dict[str, Any] = {"library_name": d.library, "tags": d.tags}
    if license or d.license:
        meta["license"] = license or d.license
    if d.base_model:
        meta["base_model"] = d.base_model
        if d.relation:
            meta["base_model_relation"] = d.relation
    data = ModelCardData(**meta)
    lines = [f"---\n{data.to_yaml()}\n---\n", f"# {repo_id.split('/')[-1]}\n", _what(d) + "\n",
             "## How to load\n", _load_snippet(d, repo_id) + "\n", "## Provenance\n", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in d.provenance] or ["| source | unknown |"]
    if files:
        lines += ["", "## Files\n", "| file | bytes |", "|---|---:|"]
        lines += [f"| `{name}` | {size:,} |" for name, size in files]
    if not (license or d.license):
        lines += ["", "License: not recorded in the source; check the base model's license before use."]
    lines += ["", f"Generated by lowbitpack {__version__}."]
    return "\n".join(lines) + "\n"


def list_files(path: Path) -> list[Path]:
    """Files to upload: everything under `path` except hidden/temporary entries (.partial, .git, caches)."""
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts):
            continue
        if f.is_file() and not f.is_symlink():
            out.append(f)
    return out


def _written_by_lowbitpack(readme: str) -> bool:
    """Cards lowbitpack writes (bundle, merge, this module) carry the `lowbitpack` tag in their front matter."""
    m = re.match(r"^---\s*\n(.*?)\n---", readme, re.S)
    if not m:
        return False
    try:
        import yaml
        meta = yaml.safe_load(m.group(1)) or {}
    except Exception:  # malformed front matter: a person's file, keep it
        return False
    return isinstance(meta, dict) and "lowbitpack" in (meta.get("tags") or [])


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


# Bounded retry of the repo/commit calls (huggingface_hub retries LFS transfers itself, not the commit).
# Retried only where the request cannot have changed the repo: a 5xx answer (the server says it failed; a commit
# is all-or-nothing) or a connection that was never established. A dropped connection or a timeout after the
# request was sent is NOT retried: the commit may have landed, and re-running `push` is the safe, visible step.
RETRY_STATUS = (500, 502, 503, 504)
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY = 1.0  # seconds; doubles per attempt (1, 2, 4)


# Bounded waits. huggingface_hub's shared httpx client has no timeout (`timeout=None`), so a Hub (or proxy) that
# accepts the connection and then never answers would hang `push` forever. During a push every request gets at
# most TIMEOUT_CONNECT s to connect and `timeout` s (default DEFAULT_TIMEOUT, env LOWBITPACK_HUB_TIMEOUT, option
# --timeout) between bytes read or written: a stall fails with one line instead. The bound is per wait, not per
# upload, so large files at any speed still go through. huggingface_hub retries LFS transfers after a timeout
# (up to 5 times, with backoff), so a stalled LFS upload fails after at most ~6·timeout + 30 s; a stalled commit
# or create_repo after `timeout` (not retried: the request may have landed).
TIMEOUT_ENV = "LOWBITPACK_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
TIMEOUT_CONNECT = 15.0


def resolve_timeout(timeout: float | None) -> float:
    """The per-wait bound in seconds: the argument, else $LOWBITPACK_HUB_TIMEOUT, else DEFAULT_TIMEOUT."""
    import os

    where = "--timeout"
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw in (None, ""):
            return DEFAULT_TIMEOUT
        where = TIMEOUT_ENV
        try:
            timeout = float(raw)
        except ValueError:
            raise OptionError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds", None,
                              f"set {TIMEOUT_ENV} to e.g. 120, or unset it") from None
    if not (timeout > 0 and timeout < 1e6):
        raise OptionError(f"{where} must be a positive number of seconds, got {timeout!r}", None, "e.g. 120")
    return float(timeout)


def _bounded_transport(inner: Any, read: float, connect: float) -> Any:
    """Wrap an httpx transport so that every request has finite connect/read/write/pool timeouts (huggingface_hub
    passes `timeout=None` on many calls, which overrides any client default: only the transport sees them all)."""
    import httpx2

    class _Bounded(httpx2.BaseTransport):
        def handle_request(self, request: Any) -> Any:
            t = dict(request.extensions.get("timeout") or {})
            for key, bound in (("connect", connect), ("read", read), ("write", read), ("pool", read)):
                if t.get(key) is None or t[key] > bound:
                    t[key] = bound
            request.extensions = {**request.extensions, "timeout": t}
            return inner.handle_request(request)

        def close(self) -> None:
            inner.close()

        def __enter__(self) -> Any:
            inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            inner.__exit__(*exc)

    return _Bounded()


@contextlib.contextmanager
def bounded_hub_session(timeout: float) -> Iterator[None]:
    """Within the block, huggingface_hub's shared client bounds every wait (see TIMEOUT_ENV above); the previous
    client factory is restored afterwards."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY
    connect = min(TIMEOUT_CONNECT, timeout)

    def factory() -> Any:
        client = previous()
        if hasattr(client, "_transport"):
            client._transport = _bounded_transport(client._transport, timeout, connect)
            mounts = getattr(client, "_mounts", None)
            if isinstance(mounts, dict):
                for k, v in list(mounts.items()):
                    if v is not None:
                        mounts[k] = _bounded_transport(v, timeout, connect)
        else:  # an unexpected client type: at least its default timeout
            client.timeout = timeout
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _with_retries(call: Any) -> Any:
    import time as _time

    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(RETRY_ATTEMPTS):
        last = attempt == RETRY_ATTEMPTS - 1
        try:
            return call()
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status not in RETRY_STATUS or last:
                raise
        except (httpx2.ConnectError, httpx2.ConnectTimeout):
            if last:
                raise
        _time.sleep(RETRY_BASE_DELAY * 2 ** attempt)
    raise AssertionError("unreachable")


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    card: str = "auto",
    timeout: float | None = None,
) -> dict[str, Any]:
    """Upload the directory `path` to the model repo `repo_id` in one commit, with a generated README.md.

    `timeout`: seconds any single wait on the Hub may take (connect: at most 15 s); default $LOWBITPACK_HUB_TIMEOUT
    or 120. A Hub that stops answering makes push fail with a HubError instead of hanging.

    `card`: "auto" keeps a README.md written by a person and replaces one lowbitpack wrote earlier (bundle /
    merge cards, tagged `lowbitpack`) by the full card; "generate" always writes ours; "keep" uploads an existing
    README.md as is. `dry_run=True` returns the file list and the card and contacts nobody. Returns {repo_id,
    revision, files, bytes, card, card_source, commit_oid, commit_url, url}.
    """
    if card not in ("auto", "generate", "keep"):
        raise OptionError(f"unknown card mode {card!r}", None, "use auto, generate or keep")
    bound = resolve_timeout(timeout)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError("no such directory", path, "pass the directory to upload (an artifact, bundle or export)")
    if not _HUB_ID.match(repo_id or ""):
        raise OptionError(f"invalid repo id {repo_id!r}", None, "use the form user-or-org/name")
    files = list_files(path)
    if not files:
        raise InputError("nothing to upload (the directory is empty)", path, "pass a directory with files")
    existing = (path / "README.md").read_text(encoding="utf-8", errors="replace") \
        if (path / "README.md").is_file() else None
    keep = existing is not None and (card == "keep" or (card == "auto" and not _written_by_lowbitpack(existing)))
    if existing is not None and not keep:
        files = [f for f in files if f != path / "README.md"]
    rels = [f.relative_to(path).as_posix() for f in files]
    sizes = [f.stat().st_size for f in files]
    has_readme = keep
    card_text = existing if keep else build_card(path, repo_id, license=license, files=list(zip(rels, sizes)))
    assert card_text is not None
    result: dict[str, Any] = {
        "repo_id": repo_id, "revision": revision or "main", "private": private,
        "files": [{"path": r, "bytes": s} for r, s in zip(rels, sizes)]
        + ([] if has_readme else [{"path": "README.md", "bytes": len(card_text.encode())}]),
        "bytes": sum(sizes) + (0 if has_readme else len(card_text.encode())), "card": card_text,
        "card_source": "existing README.md" if has_readme else "generated", "dry_run": dry_run,
    }
    if dry_run:
        return result
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    ops = [CommitOperationAdd(path_in_repo=r, path_or_fileobj=str(f)) for r, f in zip(rels, files)]
    if not has_readme:
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
    message = commit_message or f"Upload {len(ops)} files with lowbitpack {__version__}"
    import httpx2

    try:
        with bounded_hub_session(bound):
            url = _with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
            if revision and revision != "main":
                _with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model"))
            info = _with_retries(lambda: api.create_commit(repo_id, operations=ops, commit_message=message,
                                                           revision=revision, repo_type="model"))
    except httpx2.TimeoutException as e:
        raise HubError(f"upload failed (no answer from the Hub within {bound:g} s: {e.__class__.__name__})", repo_id,
                       f"check the endpoint and your network, or raise the bound with --timeout / {TIMEOUT_ENV}; "
                       "re-running push is safe") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "check the token (--token or HF_TOKEN, or `hf auth login`)",
                403: "the token lacks write access to this namespace"}.get(status, "check the repo id and endpoint")
        first = _scrub(str(e).splitlines()[0] if str(e) else e.__class__.__name__, token)
        raise HubError(f"upload failed ({first})", repo_id, hint) from None
    except Exception as e:  # httpx transport errors, malformed responses: one line, token scrubbed
        msg = _scrub(str(e), token).splitlines()[0] if str(e) else ""
        raise HubError(f"upload failed ({e.__class__.__name__}: {msg})", repo_id,
                       "check the endpoint and your network") from None
    result.update({"url": str(url), "commit_oid": info.oid, "commit_url": info.commit_url})
    return result
