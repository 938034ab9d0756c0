"""Held-out perplexity and next-token accuracy of a causal LM (the quality figure every report uses)."""
from __future__ import annotations

import math
from typing import Any

import torch


def tokenize_stream(tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t + "\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seqlen: int = 256, max_tokens: int = 16384,
               batch_size: int = 8) -> dict[str, Any]:
    """Mean NLL over non-overlapping windows of `seqlen` tokens (first `max_tokens` of the stream)."""
    ids = tokenize_stream(tokenizer, texts, max_tokens)
    n_win = len(ids) // seqlen
    if n_win == 0:
        raise ValueError("not enough text for one evaluation window")
    windows = ids[: n_win * seqlen].reshape(n_win, seqlen)
    device = next(model.parameters()).device
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in range(0, n_win, batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        tgt = x[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 reduction="sum").item()
        correct += (logits.argmax(-1) == tgt).sum().item()
        count += tgt.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "acc": correct / count, "tokens": count}
