"""Token-level perplexity over texts, with a sliding window for texts longer than the window.

Each text is scored on its own (no cross-document context). Windows of `max_length` tokens move by
`stride`; tokens already scored by an earlier window are context only (label -100), so every token is
predicted once, with up to `max_length - stride` tokens of left context (as in transformers' guide;
stride is capped at max_length - 1 so that, unlike the guide with stride == max_length, the first token
of a window is never dropped).
Perplexity = exp(total NLL / total predicted tokens) over the whole corpus. A text given as
(prefix, text) scores only the tokens after the prefix (e.g. responses, not prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from align import distributed


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int
    texts: int


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 8,
) -> PerplexityResult:
    import torch
    from tqdm.auto import tqdm

    from align.console import show_bars

    stride = min(stride, max_length - 1)  # windows overlap by >= 1 token, so no token loses its context
    windows: list[tuple[list[int], list[int]]] = []  # (input ids, labels)
    for item in texts:
        prefix, text = item if isinstance(item, tuple) else ("", item)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        skip = len(tokenizer(prefix, add_special_tokens=True)["input_ids"]) if prefix else 0
        prev_end = 0
        for begin in range(0, max(len(ids) - 1, 1), stride):
            end = min(begin + max_length, len(ids))
            chunk = ids[begin:end]
            n_new = end - prev_end  # tokens not scored by an earlier window
            labels = [-100] * (len(chunk) - n_new) + chunk[len(chunk) - n_new :]
            labels = [-100 if begin + j < skip else t for j, t in enumerate(labels)]
            windows.append((chunk, labels))
            prev_end = end
            if end == len(ids):
                break
    device = next(model.parameters()).device
    model.eval()
    parts: dict[int, tuple[float, int]] = {}  # batch index -> (summed NLL, predicted tokens)
    windows.sort(key=lambda w: len(w[0]))  # similar lengths together: less padding
    with torch.no_grad():
        for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", leave=False, disable=not show_bars()):
            if not distributed.mine(i // batch_size):
                continue  # another rank scores this batch
            batch = windows[i : i + batch_size]
            width = max(len(w[0]) for w in batch)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([w[0] + [pad] * (width - len(w[0])) for w in batch], device=device)
            mask = torch.tensor(
                [[1] * len(w[0]) + [0] * (width - len(w[0])) for w in batch],
                device=device,
            )
            labels = torch.tensor([w[1] + [-100] * (width - len(w[1])) for w in batch], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            parts[i // batch_size] = (nll.item(), int((shift_labels != -100).sum()))
    parts = distributed.merge_gathered(parts)
    total_nll = sum(parts[b][0] for b in sorted(parts))  # one summation order whatever the world size
    total_tokens = sum(parts[b][1] for b in sorted(parts))
    mean = total_nll / max(total_tokens, 1)
    return PerplexityResult(math.exp(min(mean, 700)), mean, total_tokens, len(texts))
