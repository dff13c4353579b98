"""Label likelihoods: log p(label tokens, EOS | prompt) for every prompt and label, two ways.

- shared_prompt_log_likelihoods: each prompt runs once and every label continues from its cached keys and values;
  on a CPU, where the prompt is nearly all of the cost, n labels cost about one pass instead of n.
- whole_row_log_likelihoods: each (prompt, label) pair is one row of its own, no cache: for models whose fast
  inference path owns its cache (Unsloth).
Both give the same numbers as scoring one sequence alone (tests/test_quality_gate.py). The prompt and the label are
tokenized apart, as generation sees them (it starts from the prompt's tokens).
"""

from __future__ import annotations

from typing import Any

SCORING_BATCH = 16  # prompts per forward pass (every label continues from them), or (prompt, label) rows


def shared_prompt_log_likelihoods(live: Any, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Left-padded prompts through the model once; each label continues from the cache, which is then cut back."""
    import torch

    model, pad_id = live.model, live.tokenizer.pad_token_id
    scores: list[list[float]] = []
    for start in range(0, len(prompts), SCORING_BATCH):
        chunk = prompts[start : start + SCORING_BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        lengths = mask.sum(dim=1, keepdim=True)  # each row's real positions: 0 .. length - 1, whatever the padding
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1)
            after_prompt = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            cache, rows = out.past_key_values, [[] for _ in chunk]
            for completion in completions:
                # the first token is scored from the prompt's last logits; feeding the label's tokens scores the
                # rest of it and the EOS
                fed = torch.tensor([completion[:-1]] * len(chunk), device=model.device)
                total = after_prompt[:, completion[0]].clone()
                if fed.shape[1]:
                    cont = model(input_ids=fed, attention_mask=torch.cat([mask, torch.ones_like(fed)], dim=1),
                                 position_ids=lengths + torch.arange(fed.shape[1], device=model.device),
                                 past_key_values=cache, use_cache=True)
                    log_probs = torch.log_softmax(cont.logits.float(), dim=-1)
                    targets = torch.tensor(completion[1:], device=model.device).expand(len(chunk), -1)
                    total += log_probs.gather(2, targets[:, :, None]).squeeze(2).sum(dim=1)
                    cache.crop(-fed.shape[1])  # back to the prompts alone for the next label
                for row, value in zip(rows, total.tolist()):
                    row.append(value)
        scores.extend(rows)
    return scores


def whole_row_log_likelihoods(live: Any, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Each (prompt, label) pair as one right-padded row: no cache, n labels cost n passes."""
    import torch

    model, pad_id = live.model, live.tokenizer.pad_token_id
    pairs = [(prompt, completion) for prompt in prompts for completion in completions]
    flat: list[float] = []
    for start in range(0, len(pairs), SCORING_BATCH):
        chunk = pairs[start : start + SCORING_BATCH]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, completion) in enumerate(chunk):
            ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[row, : len(prompt) + len(completion)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, (prompt, completion) in enumerate(chunk):
            # the logits at position i predict token i + 1: the completion's tokens are predicted from len(prompt) - 1 on
            predicting = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(completion)].float()
            log_probs = torch.log_softmax(predicting, dim=-1)
            flat.append(float(log_probs.gather(1, torch.tensor(completion, device=log_probs.device)[:, None]).sum()))
    n = len(completions)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
