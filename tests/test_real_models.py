"""The two real models that install offline, converted from their GGUF packages: greedy decoding
equals transformers loading the same GGUF file with `gguf_file=` (the conversion's oracle), with
dense float32 weights and with the linear weights read from the GGUF's blocks (weights="gguf")."""
import gc

import pytest
import torch

import nudgefast as nf
from nudgefast import packaged
from nudgefast.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
NEW_TOKENS = 24


def _hf_from_gguf(gguf_path):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("name, gguf, chat", [
    (packaged.SMOLLM2, packaged.smollm2_gguf_path, True),
    (packaged.GEMMA3, packaged.gemma3_gguf_path, False),
])
def test_greedy_equals_transformers_gguf(name, gguf, chat):
    model_dir = packaged.packaged_model_dir(name)
    tok = Tokenizer(model_dir)
    if chat:  # SmolLM2-Instruct answers a chat-formatted prompt
        prompt = tok.encode(tok.render_chat("You are a helpful assistant.", "What is the capital of France?", ""),
                            add_special_tokens=False)
    else:
        prompt = tok.encode("The three primary colours are")
        assert prompt[0] == tok.bos_token_id  # gemma's tokenizer adds its BOS
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    ours = {}
    for weights in ("dense", "gguf"):
        engine = nf.NudgingEngine(base=model_dir, weights=weights)
        (ours[weights],) = engine.generate_ids(base_prompts=[prompt], config=cfg)
        del engine
        gc.collect()
    hf = _hf_from_gguf(gguf())
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    for weights, completion in ours.items():
        assert completion.token_ids == expected, (weights, tok.decode(completion.token_ids), tok.decode(expected))
    assert len(set(expected)) > 5  # a real answer, not a degenerate repeat
