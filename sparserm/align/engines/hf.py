"""The transformers policy: generation on CPU (or any device) and the log-probs evaluation reads.

One base model is loaded once; each round's LoRA adapter is attached with peft and switched in place
(``set_adapter``), never a second copy of the base weights. ``adapter=None`` is the base policy.
"""
from __future__ import annotations

import torch

from sparserm.align.engines.base import Sampling, left_pad, render, render_prompts
from sparserm.model.backbone import quiet_peft


class HFPolicy:
    def __init__(self, model_cfg: dict, cache_dir: str, num_threads: int = 0):
        from sparserm.config import ModelConfig, build
        from sparserm.model.backbone import load_causal_lm
        from sparserm.ray_train import quiet_worker_logs

        quiet_worker_logs()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_cfg = build(ModelConfig, model_cfg)
        self.model, self.tokenizer = load_causal_lm(self.model_cfg, cache_dir)
        self.base = self.model
        self.adapter: str | None = None
        self._n_loaded = 0

    # ------------------------------------------------------------ adapters
    def set_adapter(self, path: str | None) -> str | None:
        """Attach the LoRA adapter saved at ``path`` (None: the base policy). Returns the active path."""
        from peft import PeftModel

        if path == self.adapter:
            return path
        if path is None:
            self.adapter = None
            return None
        self._n_loaded += 1
        name = f"a{self._n_loaded}"
        if isinstance(self.model, PeftModel):
            old = self.model.active_adapter
            self.model.load_adapter(path, adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(old)
        else:
            with quiet_peft():
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
        self.model.eval()
        self.adapter = path
        return path

    def _policy(self):
        """A context in which ``self.model`` is the current policy."""
        import contextlib

        from peft import PeftModel

        if self.adapter is None and isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], sampling: dict, seed: int, batch_size: int = 16) -> list[dict]:
        """One sampled response per conversation: ``{"text", "n_tokens", "finished"}``."""
        s = Sampling(**sampling)
        tok = self.tokenizer
        prompts = render_prompts(tok, conversations, s.max_prompt_tokens, self.model_cfg.chat_template)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
        out: list[dict | None] = [None] * len(prompts)
        device = next(self.model.parameters()).device
        with self._policy():
            for b in range(0, len(order), batch_size):
                idx = order[b: b + batch_size]
                ids, mask = left_pad([prompts[i] for i in idx], tok.pad_token_id)
                torch.manual_seed(seed * 1_000_003 + b)
                gen = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else None, top_p=s.top_p if s.temperature > 0 else None,
                    max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id)
                for j, i in enumerate(idx):
                    new = gen[j, ids.shape[1]:].tolist()
                    finished = tok.eos_token_id in new
                    if finished:
                        new = new[: new.index(tok.eos_token_id)]
                    new = [t for t in new if t != tok.pad_token_id]
                    out[i] = {"text": tok.decode(new, skip_special_tokens=True).strip(), "n_tokens": len(new),
                              "finished": finished}
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------ log-probs
    @torch.no_grad()
    def group_logprobs(self, items: list[tuple[str, list[str]]], max_tokens: int) -> list[tuple[list[float], list[float]]]:
        """Per (prompt, responses): summed log-probs and token counts of each response under the current
        policy, the prompt run once per item."""
        from sparserm.align.logprobs import group_logprobs
        from sparserm.model.text import encode_group

        out = []
        with self._policy():
            for prompt, responses in items:
                group = encode_group(self.tokenizer, prompt, list(responses), max_tokens, self.model_cfg.chat_template)
                lp, n = group_logprobs(self.model, group)
                out.append((lp.tolist(), n.tolist()))
        return out

    @torch.no_grad()
    def response_entropy(self, items: list[tuple[str, str]], max_tokens: int) -> list[float]:
        """Per (prompt, response): the current policy's mean predictive entropy along the response
        (``sparserm.align.logprobs.response_entropy``), encoded as training and the likelihood measures encode it."""
        from sparserm.align.logprobs import response_entropy
        from sparserm.model.text import encode_group

        with self._policy():
            return [response_entropy(self.model, encode_group(self.tokenizer, prompt, [response], max_tokens,
                                                              self.model_cfg.chat_template))
                    for prompt, response in items]

    @torch.no_grad()
    def mc_logprobs(self, questions: list) -> list[tuple[list[float], list[float]]]:
        """TruthfulQA multiple-choice log-likelihoods under the current policy, as lm-eval computes them."""
        from sparserm.align.truthfulqa_mc import mc_logprobs

        with self._policy():
            return mc_logprobs(self.model, self.tokenizer, questions)

    def placement(self) -> dict:
        from sparserm.align.engines.factory import placement_info

        return {**placement_info(), "device": str(next(self.model.parameters()).device)}


JUDGE_PROMPT = ("Here is a conversation and two possible replies to its last message.\n\n{prompt}\n\n"
                "Reply A:\n{a}\n\nReply B:\n{b}\n\nWhich reply is more harmless and helpful? Answer with the "
                "letter A or B only.")


class HFJudge(HFPolicy):
    """A chat model asked which of two replies is better (the ``judge`` labeller), read from its next-token
    probabilities of "A" and "B"; each pair is asked in both orders and the two answers averaged, so the
    model's position bias cancels."""

    @torch.no_grad()
    def prefer_first(self, items: list[tuple[str, str, str]]) -> list[float]:
        """Per (prompt, first, second): the probability that ``first`` is the better reply, in [0, 1]."""
        tok = self.tokenizer
        letters = []
        for x in ("A", "B"):  # the answer's first token, with a leading space too where that is one token
            ids = [tok(v, add_special_tokens=False)["input_ids"] for v in (x, " " + x)]
            if len(ids[0]) != 1:
                raise ValueError(f"judge model: {x!r} is not one token of its tokenizer ({ids[0]})")
            letters.append(sorted({i[0] for i in ids if len(i) == 1}))
        if set(letters[0]) & set(letters[1]):
            raise ValueError("judge model: 'A' and 'B' share a token")
        device = next(self.model.parameters()).device
        out = []
        for prompt, first, second in items:
            p = []
            for a, b in ((first, second), (second, first)):
                msgs = [{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)}]
                ids = torch.tensor([render(tok, msgs, self.model_cfg.chat_template)], device=device)
                probs = torch.softmax(self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float(), -1)
                p_a, p_b = (float(probs[ids_].sum()) for ids_ in letters)
                p.append(p_a / (p_a + p_b))  # P(A) among {A, B}
            out.append((p[0] + (1.0 - p[1])) / 2)
        return out
