"""The vLLM sampling backend against the Hugging Face one. vLLM pins another transformers than the main environment,
so these tests run in their own environment (`make test-vllm`, which CI runs); elsewhere they are skipped. One engine
serves the module: each start costs tens of seconds on a CPU."""

import math
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm has it)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # three engines start in this process (the backend's own: 4)

from conftest import stage  # noqa: E402

from mocd_train.assets import SMOLLM2, load_prompts, resolve_model  # noqa: E402
from mocd_train.data import eos_ids, load_rollouts, sample_responses  # noqa: E402
from mocd_train.decoding.backends import HFBackend, VLLMBackend  # noqa: E402
from mocd_train.decoding.decoders import block_rule  # noqa: E402
from mocd_train.decoding.engine import BlockEngine  # noqa: E402
from mocd_train.models import load_causal_lm  # noqa: E402
from mocd_train.rewards import RewardSet  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = [p.text for p in load_prompts(["chatterbot", "donotanswer", "truthfulqa"], "train", 0.2, 50)]


@pytest.fixture(scope="module")
def smollm2():
    policy, tok = load_causal_lm(SMOLLM2, torch.device("cpu"), "float32")
    return policy, tok


@pytest.fixture(scope="module")
def llm(smollm2):
    _, tok = smollm2
    return VLLMBackend.load(resolve_model(SMOLLM2), tok, device=torch.device("cpu"), dtype=torch.float32, seed=0).llm


def backends(smollm2, llm, temperature):
    policy, tok = smollm2
    stop = eos_ids(policy, tok)
    hf = HFBackend(policy, tok.pad_token_id, torch.tensor(stop), temperature=temperature)
    return hf, VLLMBackend(llm, stop, tok.pad_token_id, temperature=temperature)


def test_greedy_responses_are_the_hugging_face_backends_tokens(smollm2, llm):
    _, tok = smollm2
    hf, vllm = backends(smollm2, llm, temperature=0.0)
    prompts = PROMPTS[:12]
    a = sample_responses(hf, tok, prompts, 1, 32, temperature=0.0)
    b = sample_responses(vllm, tok, prompts, 1, 32, temperature=0.0)
    same = [x["response_ids"] == y["response_ids"] for x, y in zip(a, b)]
    # fp32 on both sides: argmax ties broken by rounding differences are the only allowed cause of a divergence,
    # and then only after a shared prefix
    for x, y, ok in zip(a, b, same):
        if not ok:
            n = next(i for i, (s, t) in enumerate(zip(x["response_ids"], y["response_ids"])) if s != t)
            assert n >= 8, (x["response"], y["response"])
    assert sum(same) >= len(same) - 1


def test_sampled_rewards_agree_within_two_standard_errors(smollm2, llm):
    _, tok = smollm2
    hf, vllm = backends(smollm2, llm, temperature=1.0)
    rewards = RewardSet.from_config(["readability", "positivity"])
    torch.manual_seed(0)
    stats = []
    for backend in (hf, vllm):
        rows = sample_responses(backend, tok, PROMPTS, 4, 24)  # 50 prompts × 4 = 200 samples
        scores = rewards.score([p for p in PROMPTS for _ in range(4)], [r["response"] for r in rows]).double()
        stats.append((scores.mean(0), scores.std(0) / math.sqrt(len(rows))))
    (m1, s1), (m2, s2) = stats
    assert bool(((m1 - m2).abs() <= 2 * (s1**2 + s2**2).sqrt()).all()), (m1, m2, s1, s2)


def test_rmod_blocks_on_vllm_resubmit_the_kept_prefix_from_the_prefix_cache(smollm2, llm):
    _, tok = smollm2
    _, vllm = backends(smollm2, llm, temperature=1.0)
    rewards = RewardSet.from_config(["readability", "positivity"])
    from mocd_train.rewards import Normalizer

    rewards.normalizer = Normalizer(["readability", "positivity"], [50.0, 0.0], [20.0, 1.0])
    engine = BlockEngine(None, tok, reward_set=rewards, num_candidates=4, block_size=8, max_new_tokens=32,
                         batch_size=4, backend=vllm)
    out = engine.generate(PROMPTS[:4], block_rule("rmod", 2, rmod_lambda=5.0), torch.Generator().manual_seed(0))
    for d in out:
        assert d.text and 1 <= len(d.trace) <= 4
        assert all(len(t["values"]) == 4 and 0 <= t["chosen"] < 4 for t in d.trace)
        assert d.cost["policy_tokens"] > 0
    # later blocks re-submit prompt + kept tokens: the prefix cache serves most of them
    cached, computed = (sum(d.cost[c] for d in out) for c in ("cached_tokens", "prefill_tokens"))
    assert cached > computed


def test_rollouts_and_teach_stages_run_on_vllm(tmp_path):
    common = ["--run_dir", str(tmp_path), "--objectives", "[readability, positivity]", "--report_to", "none",
              "--backend", "vllm", "--dtype", "float32"]
    stage("rollouts").main([*common, "--max_prompts", "6", "--num_samples", "2", "--max_new_tokens", "16",
                            "--chunk_size", "3"])
    ds, _ = load_rollouts(tmp_path)
    assert len(ds) == 12 and all(r["num_response_tokens"] <= 16 for r in ds)
    out = stage("teach").main([*common, "--decoder", "rmod", "--score_with", "reward", "--max_prompts", "3",
                               "--num_candidates", "2", "--block_size", "8", "--max_new_tokens", "16"])
    from datasets import load_from_disk

    teach = load_from_disk(str(out / "dataset"))
    assert len(teach) == 3 and all(r["response"] for r in teach)
