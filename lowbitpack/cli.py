"""Command line: parse options, call lowbitpack.api, render with rich. No logic lives here."""
from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from . import api
from .errors import LowbitpackError
from .schemes import SCHEMES
from .version import __version__

console = Console(stderr=True)
out_console = Console()


def handle_errors(fn):
    """One-line errors and a nonzero exit; a traceback only with --debug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = (ctx.find_root().obj or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except LowbitpackError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - last resort: still one line
            if debug:
                raise
            msg = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: {e.__class__.__name__}: {msg} (re-run with --debug for a traceback)", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="lowbitpack")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Packed low-bit checkpoints, adapters that know their base, Post-LoRA Restoration."""
    ctx.obj = {"debug": debug}


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


@main.command()
@click.argument("src")
@click.option("-o", "--out", required=True, help="Output artifact directory (must not exist unless --force).")
@click.option("--scheme", type=click.Choice(SCHEMES), default="nf4", show_default=True)
@click.option("--group-size", type=int, default=None, help="Group along the input dim (default 128; nf4: blocksize 64).")
@click.option("--bits", type=float, default=None, help="LowRA average-bit budget, or QA-LoRA bit width.")
@click.option("--modules", default=None, help="Regex of tensor names to quantize (default: decoder linear weights).")
@click.option("--calib", type=click.Path(dir_okay=False), default=None, help="Calibration text (plain or JSONL).")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening (fraction of mean diag).")
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by decreasing Hessian diagonal.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available) for calibration.")
@click.option("--nproc", type=int, default=None,
              help="Run N local ranks with torch.distributed (gloo on CPU, NCCL on GPUs); torchrun works too.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def quantize(src, out, scheme, group_size, bits, modules, calib, calib_samples, calib_seqlen, seed, damp,
             act_order, device, nproc, force, as_json, no_progress):
    """Quantize the HF checkpoint SRC (directory or Hub id) into a packed artifact. SRC may be `default`
    for the offline SmolLM2-135M-Instruct."""
    if src == "default":
        src = str(api.default_model())
    manifest = api.quantize(src, out, scheme, group_size=group_size, bits=bits, modules=modules, calib=calib,
                            calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, damp=damp,
                            act_order=act_order, device=device, force=force, progress=not no_progress,
                            nproc=nproc)
    from .dist import is_rank_zero
    if not is_rank_zero():  # under torchrun: rank 0 reports
        return
    summary = api.inspect(out)["totals"]
    result = {"out": out, "scheme": scheme, "seconds": manifest.get("timing", {}).get("seconds"), **summary}
    if as_json:
        _print_json(result)
    else:
        console.print(f"[green]wrote[/] {out}: {summary['params_quantized']:,} params quantized, "
                      f"{summary['avg_bits_quantized']:.3f} bits/weight in quantized tensors, "
                      f"{summary['compression_ratio']:.2f}x smaller")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: first 40 rows).")
@handle_errors
def inspect(path, as_json, show_all):
    """Describe a source checkpoint or a packed artifact: per-tensor table, totals, bits per weight."""
    info = api.inspect(path)
    if as_json:
        _print_json(info)
        return
    t = Table(title=f"{info['kind']}: {info['path']}"
              + (f" (format v{info['format_version']})" if info["format_version"] else ""))
    for col in ("tensor", "scheme", "bits", "group", "shape", "bytes", "bits/w"):
        t.add_column(col, justify="right" if col in ("bits", "group", "bytes", "bits/w") else "left")
    rows = info["tensors"] if show_all else info["tensors"][:40]
    for r in rows:
        bpw = r.get("bits_per_weight", r["bits"])
        bits = r["bits"]
        if r.get("bit_histogram"):
            bits = " ".join(f"{k}b:{v}" for k, v in sorted(r["bit_histogram"].items()))
        t.add_row(r["name"], r["scheme"], str(bits), str(r["group_size"] or "-"), "x".join(map(str, r["shape"])),
                  f"{r['bytes']:,}", f"{bpw:.3f}")
    out_console.print(t)
    if len(rows) < len(info["tensors"]):
        out_console.print(f"... {len(info['tensors']) - len(rows)} more rows (--all to list them)")
    tot = info["totals"]
    out_console.print(
        f"params {tot['params']:,}  bytes {tot['bytes']:,}  avg bits/weight {tot['avg_bits_per_weight']:.3f}"
        + (f"  quantized tensors {tot['avg_bits_quantized']:.3f} bits/weight" if "avg_bits_quantized" in tot else "")
        + f"  compression {tot['compression_ratio']:.2f}x")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def verify(path, as_json):
    """Check every file of an artifact, bundle, merge or export output against the hashes in its manifest."""
    res = api.verify(path)
    if as_json:
        _print_json(res)
    else:
        console.print(f"[green]ok[/] {path}: {res['kind']}, {res['files_checked']} files match their sha256")


@main.command("default-model")
@click.option("--refresh", is_flag=True, help="Convert the GGUF again.")
@handle_errors
def default_model(refresh):
    """Print the path of the offline default model (SmolLM2-135M-Instruct), converting it on first use."""
    click.echo(str(api.default_model(refresh)))


_EXPORT_CHOICES = ("hf", "bnb-nf4", "bnb-int8", "gptq", "compressed-tensors", "gguf")


@main.command("import")
@click.argument("src")
@click.option("-o", "--out", required=True, help="Output artifact directory (must not exist unless --force).")
@click.option("--format", "fmt", type=click.Choice(("auto", "bnb", "gptq", "compressed-tensors")), default="auto",
              show_default=True, help="Input kind; auto reads quantization_config.quant_method in config.json.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the artifact manifest as JSON on stdout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def import_cmd(src, out, fmt, force, as_json, no_progress):
    """Convert a bitsandbytes / GPTQ / compressed-tensors checkpoint SRC (directory or Hub id) into an artifact,
    codes unchanged."""
    m = api.import_checkpoint(src, out, fmt, force=force, progress=not no_progress)
    if as_json:
        _print_json(m)
        return
    q, s = m.get("quantization", {}), m.get("summary", {})
    console.print(f"[green]wrote[/] {out} (imported from {q.get('imported_from', fmt)}, scheme {q.get('scheme')}, "
                  f"{s.get('params_quantized', 0):,} of {s.get('params_total', 0):,} parameters quantized)")


@main.command("export")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(_EXPORT_CHOICES), required=True, help="Target format.")
@click.option("-o", "--out", required=True, help="Output directory (must not exist unless --force).")
@click.option("--dtype", default=None, help="hf: bf16 (default), fp16 or fp32. compressed-tensors: scale dtype.")
@click.option("--gguf-type", type=click.Choice(("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")), default=None,
              help="gguf: tensor type of 2-D weights (default q8_0).")
@click.option("--embed-type", type=click.Choice(("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")), default=None,
              help="gguf: type of token_embd/output (default: q8_0 for 4-bit types, else --gguf-type).")
@click.option("--exact/--requantize", "exact", default=None,
              help="gguf: require (--exact) or forbid (--requantize) writing intg codes directly as Q4_1/Q4_0/Q8_0 "
                   "blocks; default: direct wherever the layout allows.")
@click.option("--strict", is_flag=True, help="compressed-tensors: refuse instead of rounding inexact values.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def export_cmd(path, fmt, out, dtype, gguf_type, embed_type, exact, strict, force, as_json, no_progress):
    """Export a packed artifact PATH (or, for hf/gguf, a merged HF checkpoint) to a format other runtimes load."""
    opts = {}
    if dtype and fmt not in ("hf", "compressed-tensors"):
        raise click.UsageError("--dtype applies to --format hf and compressed-tensors only")
    if strict and fmt != "compressed-tensors":
        raise click.UsageError("--strict applies to --format compressed-tensors only")
    if fmt == "hf" and dtype:
        opts["dtype"] = dtype
    if fmt == "compressed-tensors":
        if dtype:
            opts["scale_dtype"] = dtype
        if strict:
            opts["strict"] = True
    if fmt == "gguf":
        opts.update({k: v for k, v in (("gguf_type", gguf_type), ("embed_type", embed_type),
                                       ("exact_from_intg", exact)) if v is not None})
    elif gguf_type or embed_type or exact is not None:
        raise click.UsageError("--gguf-type/--embed-type/--exact apply to --format gguf only")
    res = api.export(path, out, fmt, force=force, progress=not no_progress, **opts)
    if as_json:
        _print_json(res)
        return
    detail = ""
    if "exact" in res:
        detail = "exact" if res["exact"] else "inexact" + (
            f", max abs error {res['max_abs_error']:.3g}" if isinstance(res.get("max_abs_error"), float) else "")
    elif "errors" in res:
        detail = ", ".join(f"{k} err {v['max_abs_error']:.3g}" for k, v in res["errors"].items())
    console.print(f"[green]wrote[/] {out} ({fmt}{': ' + detail if detail else ''})")
    for note in res.get("notes", []):
        console.print(f"[yellow]note[/] {note}")


@main.command("push")
@click.argument("path")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (if it does not exist).")
@click.option("--revision", default=None, help="Branch to commit to (created if missing; default main).")
@click.option("--dry-run", is_flag=True, help="Print the file list and model card; upload nothing.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login). Never printed.")
@click.option("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
@click.option("--license", "license_", default=None, help="License id for the card, when the source has none.")
@click.option("--message", default=None, help="Commit message.")
@click.option("--card", type=click.Choice(("auto", "generate", "keep")), default="auto", show_default=True,
              help="README.md: auto keeps a hand-written one and regenerates lowbitpack's.")
@click.option("--timeout", type=float, default=None,
              help="Seconds any single wait on the Hub may take (default: LOWBITPACK_HUB_TIMEOUT or 120).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (without the card).")
@handle_errors
def push_cmd(path, repo_id, private, revision, dry_run, token, endpoint, license_, message, card, timeout, as_json):
    """Upload PATH (artifact, bundle or export) to the Hub repo REPO_ID in one commit, with a model card."""
    res = api.push(path, repo_id, private=private, revision=revision, dry_run=dry_run, token=token,
                   endpoint=endpoint, license=license_, commit_message=message, card=card, timeout=timeout)
    if as_json:
        _print_json({k: v for k, v in res.items() if k != "card"})
        return
    t = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {repo_id}@{res['revision']}")
    t.add_column("file")
    t.add_column("bytes", justify="right")
    for f in res["files"]:
        t.add_row(f["path"], f"{f['bytes']:,}")
    out_console.print(t)
    if dry_run:
        out_console.print(f"--- README.md ({res['card_source']}) ---")
        click.echo(res["card"])
    else:
        console.print(f"[green]committed[/] {res['commit_oid'][:12]} {res['commit_url']}")


@main.command("train")
@click.argument("packed")
@click.option("-o", "--out", required=True, help="Output PEFT adapter directory (must not exist unless --force).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Training text: plain text or JSONL with a 'text' field (default: offline KJV training split).")
@click.option("--r", "r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=16, show_default=True, help="LoRA alpha (scaling = alpha / r).")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--target-modules", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
              help="Comma-separated module names to adapt.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised scaling alpha / sqrt(r).")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimiser steps.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", default=None, help="Compute dtype of the base: bf16, fp16, fp32 (default: fp32 on CPU, bf16 on GPU).")
@click.option("--cache-dense/--no-cache-dense", default=None,
              help="Keep dequantized weights after first use (default: on CPU only).")
@click.option("--adapter", type=click.Choice(("lora", "qalora", "qwha")), default="lora", show_default=True,
              help="qalora: QA-LoRA (input pooled per group; merges exactly into the base with merge --fold). "
                   "qwha: sparse Walsh-Hadamard spectrum (QWHA reference format).")
@click.option("--qalora-group-size", type=int, default=None,
              help="QA-LoRA pooling group (default: the base's group size).")
@click.option("--n-frequency", type=int, default=None, help="qwha: spectrum entries per layer (default r*(in+out)).")
@click.option("--scaling", type=float, default=None, help="qwha: adapter scaling (default 3000).")
@click.option("--qwha-init", type=click.Choice(("error", "zeros")), default="error", show_default=True,
              help="qwha: 'error' cancels the quantization error W - Q(W) (needs the original), 'zeros' random "
                   "locations and zero spectrum (the reference's init_weights=True).")
@click.option("--qwha-selection", type=click.Choice(("channel", "global")), default="channel", show_default=True,
              help="qwha init: per-channel allocation (paper) or the layer's largest coefficients.")
@click.option("--random-loc-seed", type=int, default=777, show_default=True, help="qwha: seed of random locations.")
@click.option("--original", default=None, help="qwha init: the original model (default: the artifact's source).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the training record as JSON on stdout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def train_cmd(packed, out, data, r, alpha, dropout, target_modules, rslora, lr, epochs, max_steps, batch_size,
              seq_len, seed, device, dtype, cache_dense, adapter, qalora_group_size, n_frequency, scaling, qwha_init,
              qwha_selection, random_loc_seed, original, force, as_json, no_progress):
    """Train a LoRA adapter on the packed artifact PACKED (QLoRA-style); writes a standard PEFT adapter."""
    targets = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    rec = api.train(packed, out, data=data, r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                    use_rslora=rslora, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                    seq_len=seq_len, seed=seed, device=device, dtype=dtype, cache_dense=cache_dense, force=force,
                    progress=not no_progress, adapter=adapter, qalora_group_size=qalora_group_size,
                    n_frequency=n_frequency, scaling=scaling, qwha_init=qwha_init, qwha_selection=qwha_selection,
                    random_loc_seed=random_loc_seed, original=original)
    if as_json:
        _print_json(rec)
        return
    res = rec["result"]
    console.print(f"[green]wrote[/] {out}: {res['steps']} steps, loss {res['first_loss']:.4f} -> "
                  f"{res['final_loss']:.4f} (mean of last {res['final_loss_window']}), {res['seconds']:.1f} s")


@main.command("bundle")
@click.argument("adapter")
@click.option("--base", required=True, help="The packed artifact the adapter was trained on (or the original model).")
@click.option("-o", "--out", required=True, help="Output bundle directory (must not exist unless --force).")
@click.option("--trained-on", default=None,
              help="Declare the training base's scheme when --base is not what it was trained on (e.g. bnb-nf4).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle manifest as JSON on stdout.")
@handle_errors
def bundle_cmd(adapter, base, out, trained_on, force, as_json):
    """Bundle the PEFT adapter dir ADAPTER with what it was trained on (scheme, bits, base tensor hashes)."""
    m = api.bundle(adapter, base, out, trained_on=trained_on, force=force)
    if as_json:
        _print_json(m)
        return
    b = m["base"]
    console.print(f"[green]wrote[/] {out}: {m['adapter']['type']} on {len(m['adapter']['modules'])} modules, "
                  f"base {b.get('model_id')} {b.get('scheme')}"
                  + (f" {b['bits']}-bit" if b.get("bits") else "") + f", bundle id {m['bundle_id'][:16]}")


@main.command("merge")
@click.argument("bundle")
@click.option("--restore", type=click.Choice(["16", "8", "4", "3", "2"]), required=True,
              help="Bits of the restored base: 16 = the full-precision original.")
@click.option("-o", "--out", required=True, help="Output directory (must not exist unless --force).")
@click.option("--original", default=None, help="The full-precision original (dir or Hub id); default: recorded in the bundle.")
@click.option("--fold", is_flag=True, help="8/4/3/2: merge the adapter, then quantize (default: adapter kept beside).")
@click.option("--scheme", default=None, help="8/4/3/2: quantization scheme of the restored base (default int8/int4/gptq3/gptq2).")
@click.option("--format", "fmt", default=None,
              help="hf (16-bit default), ours (lowbitpack artifact, 8/4/3/2 default) or an export format "
                   "(bnb-nf4, bnb-int8, gptq, compressed-tensors, gguf).")
@click.option("--dtype", default=None, help="Floating dtype of written tensors: bf16, fp16, fp32 (default: the source's).")
@click.option("--group-size", type=int, default=None, help="8/4/3/2: group size of the restored base.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None, help="GPTQ calibration text (3/2 bits).")
@click.option("--allow-base-mismatch", is_flag=True, help="Merge even if the original's hashes differ (warns).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the merge manifest as JSON on stdout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def merge_cmd(bundle, restore, out, original, fold, scheme, fmt, dtype, group_size, calib, allow_base_mismatch,
              force, as_json, no_progress):
    """Post-LoRA Restoration: apply the adapter of BUNDLE to its base restored to --restore bits."""
    import warnings as _warnings
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        m = api.merge(bundle, out, restore=int(restore), original=original, fold=fold, scheme=scheme, format=fmt,
                      dtype=dtype, group_size=group_size, calib=calib, allow_base_mismatch=allow_base_mismatch,
                      force=force, progress=not no_progress)
    for w in caught:
        if issubclass(w.category, UserWarning) and "lowbitpack" in (w.filename or "") + str(w.category.__module__):
            console.print(f"[yellow]warning[/] {w.message}")
    if as_json:
        _print_json(m)
        return
    r = m["restore"]
    what = ("merged" if r["merged"] else "adapter beside") + (f", {r['scheme']}" if r["scheme"] != "none" else "")
    err = m.get("errors")
    detail = f", {err['what']} mean {err['mean']:.4f}" if err else ""
    console.print(f"[green]wrote[/] {out}: restore {r['bits']} ({what}), format {r['format']}{detail}")


if __name__ == "__main__":
    main()
