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
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--no-progress", is_flag=True)
@handle_errors
def quantize(src, out, scheme, group_size, bits, modules, calib, calib_samples, calib_seqlen, seed, damp,
             act_order, device, force, as_json, no_progress):
    """Quantize the HF checkpoint SRC (directory or Hub id) into a packed artifact. SRC may be `default`
    for the offline SmolLM2-135M-Instruct."""
    if src == "default":
        src = str(api.default_model())
    manifest = api.quantize(src, out, scheme, group_size=group_size, bits=bits, modules=modules, calib=calib,
                            calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, damp=damp,
                            act_order=act_order, device=device, force=force, progress=not no_progress)
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
    """Check every file of an artifact or bundle against the hashes in its manifest."""
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


if __name__ == "__main__":
    main()
