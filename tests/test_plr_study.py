"""The PLR study's plumbing (examples/plr/study.py): options, table and plot, on synthetic results."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plr_study", ROOT / "examples" / "plr" / "study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["plr_study"] = study   # dataclasses look their module up
spec.loader.exec_module(study)


def test_modes_fill_unset_options_and_flags_override():
    a = study.parse_args(["--mode", "full", "--steps", "7"])
    assert a.steps == 7 and a.eval_tokens == study.MODES["full"]["eval_tokens"]
    assert a.bases == study.DEFAULT_BASES and a.restores == [16, 8, 4]
    assert a.tag == "smollm2-135m-full" and a.work.endswith("smollm2-135m-full")


def test_unknown_base_is_refused(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--bases", "int4,int5"])
    assert "int5" in capsys.readouterr().err


def test_every_base_names_a_real_scheme():
    from lowbitpack.schemes import make_scheme
    for base in study.BASES.values():
        opts = {k: v for k, v in base.quantize.items() if k in ("bits", "group_size")}
        assert make_scheme(base.scheme, **opts) is not None, base.name


def _result() -> dict:
    cell = lambda p: {"ppl": p, "acc": 0.5}  # noqa: E731
    return {
        "command": "python examples/plr/study.py", "mode": "small", "model": "tiny (local)",
        "eval": {"data": "test", "tokens": 64, "seqlen": 16, "dtype": "float32", "device": "cpu"},
        "train": {"r": 16, "alpha": 16, "steps": 2, "batch": 1, "seq_len": 8, "lr": 2e-4, "seed": 1},
        "calibration": {"samples": 2, "seqlen": 8},
        "references": {"original": cell(10.0), "LoRA-16": cell(9.0)},
        "table": [
            {"name": "nf4", "bits": 4, "base": cell(12.0), "QLoRA": cell(11.0), "fold": None, "PLR4": None,
             "PLR8": cell(9.6), "PLR16": cell(9.5)},
            {"name": "qalora2", "bits": 2, "base": cell(900.0), "QLoRA": cell(50.0), "fold": cell(50.1),
             "PLR4": cell(20.0), "PLR8": cell(12.0), "PLR16": cell(11.9)},
            {"name": "int2", "bits": 2, "base": cell(1e6), "QLoRA": None, "fold": None, "PLR4": None,
             "PLR8": None, "PLR16": None},
        ],
        "machine": {"gpu": None, "platform": "x", "cpus": 2, "torch": "t"},
    }


def test_markdown_has_one_row_per_base_with_its_cells():
    md = study.markdown(_result())
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| training", "| ---"))]
    assert [r.split("|")[1].strip() for r in rows] == ["nf4", "qalora2", "int2"]
    assert "50.100 / 0.500" in rows[1] and "11.900 / 0.500" in rows[1]
    assert rows[2].count("/") == 1          # base alone only


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    assert study.plot(_result(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
