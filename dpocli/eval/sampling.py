"""Generations for held-out prompts and a Monte-Carlo estimate of KL(policy ‖ reference).

KL(π‖π_ref) = E_{y~π(·|x)} [log π(y|x) − log π_ref(y|x)]: we draw `kl_samples` completions per
prompt from the policy at temperature 1 with no top-k/top-p truncation (anything else samples a
different distribution and biases the estimate), score each under both models with the same
completion scorer as training, and average. This is the x-axis of the DPO paper's reward/KL
frontier; the offline mean of Δ over the dataset is not a KL.
"""

from __future__ import annotations

import math

import torch

from dpocli.io.console import warn
from dpocli.model.batching import collate
from dpocli.model.load import load_causal_lm, load_tokenizer
from dpocli.model.logprobs import CompletionScorer, sequence_logps

# Where a config states how many positions the model has (Llama/Mistral/Qwen, GPT-2, others).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model) -> int | None:
    """The number of positions the model was built for, if its config says."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def new_token_room(model, prompt_len: int, max_new_tokens: int) -> int:
    """--max-new-tokens, capped so that prompt + generation fit the model's context (0 when the
    prompt alone fills it): past its positions a model's output is meaningless, and a huge value
    would run for hours. `sample_report` warns when the cap applies."""
    context = context_length(model)
    return max_new_tokens if context is None else max(0, min(max_new_tokens, context - prompt_len))


def _generate(model, prompt_ids: list[int], tokenizer, *, n: int, max_new_tokens: int,
              temperature: float, device) -> list[list[int]]:
    """`n` completions (token ids, cut after EOS) of one prompt, within the model's context."""
    max_new_tokens = new_token_room(model, len(prompt_ids), max_new_tokens)
    if max_new_tokens == 0:
        return [[] for _ in range(n)]
    inputs = torch.tensor([prompt_ids] * n, device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
    completions = []
    stops = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>",)
                                       if t in tokenizer.get_vocab())}
    for row in out[:, len(prompt_ids):].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:cut])
    return completions


def sample_report(model, model_path: str, data, n_prompts: int, *, ref_model: str | None,
                  max_new_tokens: int, temperature: float, kl_samples: int, seed: int, device,
                  dtype: str, tokenizer_dir) -> dict:
    tokenizer = load_tokenizer(str(tokenizer_dir))
    reference = load_causal_lm(ref_model, dtype=dtype, device=device) if ref_model else None
    model.eval()
    rows = list(range(min(n_prompts, data.num_rows)))  # cache rows are in input order
    longest = max((len(data.row_list("prompt_ids", i)) for i in rows), default=0)
    _warn_if_capped([m for m in (model, reference) if m is not None], max_new_tokens, longest)
    report = {"generations": []}
    torch.manual_seed(seed)
    for i in rows:
        prompt = data.row_list("prompt_ids", i).tolist()
        entry = {"id": data.ids[i], "prompt": tokenizer.decode(prompt, skip_special_tokens=True)}
        for name, m in (("policy", model), ("reference", reference)):
            if m is not None:
                ids = _generate(m, prompt, tokenizer, n=1, max_new_tokens=max_new_tokens,
                                temperature=temperature, device=device)[0]
                entry[name] = tokenizer.decode(ids, skip_special_tokens=True)
        report["generations"].append(entry)
    if reference is not None and kl_samples > 0:
        policy_scorer, ref_scorer = CompletionScorer(model), CompletionScorer(reference)
        values = []
        for i in rows:
            prompt = data.row_list("prompt_ids", i).tolist()
            comps = [c for c in _generate(model, prompt, tokenizer, n=kl_samples,
                                          max_new_tokens=max_new_tokens, temperature=1.0,
                                          device=device) if c]
            if not comps:
                continue
            # Score the samples as "chosen" rows of a batch; the rejected half repeats them.
            batch = collate([prompt] * len(comps), comps, comps, tokenizer.pad_token_id or 0).to(device)
            with torch.no_grad():
                lp = sequence_logps(policy_scorer, batch).chosen_logps
                lr = sequence_logps(ref_scorer, batch).chosen_logps
            values += (lp - lr).cpu().tolist()
        if values:
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
            report["kl_policy_ref"] = {"estimate": mean, "stderr": math.sqrt(var / len(values)),
                                       "samples": len(values), "prompts": len(rows)}
    return report


def _warn_if_capped(models: list, max_new_tokens: int, longest_prompt: int) -> None:
    contexts = [c for c in (context_length(m) for m in models) if c is not None]
    if contexts and longest_prompt + max_new_tokens > min(contexts):
        warn(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {min(contexts)} "
             f"positions after a prompt of up to {longest_prompt} tokens: a generation stops where the "
             "context ends")
