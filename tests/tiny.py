"""Tiny random causal LMs and a word-level tokenizer for fast unit tests."""

import numpy as np
import torch
import transformers

from dpo_fast import PreferenceExample

VOCAB = 128
WORDS = ("the a movie film was is great bad good awful plot acting fun dull review write one "
         "sentence of about it and but not very user assistant").split()


def tiny_config(**kw):
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
               initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config(**kw)).eval()


def random_examples(n, seed=0, max_prompt=12, max_resp=14):
    g = np.random.default_rng(seed)
    return [PreferenceExample(g.integers(0, VOCAB, g.integers(1, max_prompt + 1)),
                              g.integers(0, VOCAB, g.integers(1, max_resp + 1)),
                              g.integers(0, VOCAB, g.integers(1, max_resp + 1)))
            for _ in range(n)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>"
                          "{% endfor %}{% if add_generation_prompt %}<s>assistant{% endif %}")
    return fast


def word_rows(n, seed=0):
    """n preference rows of random words (prompt 2-8 words, responses 1-5)."""
    g = np.random.default_rng(seed)

    def words(k):
        return " ".join(g.choice(WORDS[:-2], size=k))

    return [{"prompt": words(int(g.integers(2, 9))), "chosen": " " + words(int(g.integers(1, 6))),
             "rejected": " " + words(int(g.integers(1, 6)))} for _ in range(n)]
