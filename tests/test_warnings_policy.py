"""pyproject's filterwarnings: a deprecation megl triggers fails the suite; one inside a third-party package does not."""
import warnings

import pytest
import torch


def _warn_from(module: str):
    exec(compile('import warnings\nwarnings.warn("old_api is deprecated", FutureWarning)', "<x>", "exec"),
         {"__name__": module})


def test_a_deprecation_raised_from_megl_is_an_error():
    with pytest.raises(FutureWarning):
        _warn_from("megl.models.sdtg")
    with pytest.warns(FutureWarning):  # third-party internals only warn
        _warn_from("somelib.internal")


def test_a_deprecated_argument_megl_passes_to_a_model_forward_is_an_error():
    class Model(torch.nn.Module):  # transformers' deprecate_kwarg warns at the caller of forward: Module.__call__
        def forward(self, x, past=None):
            if past is not None:
                warnings.warn("`past` is deprecated and will be removed", FutureWarning, stacklevel=2)
            return x

    Model()(torch.zeros(1))
    with pytest.raises(FutureWarning):
        Model()(torch.zeros(1), past=1)


def test_greedy_generation_uses_the_current_cache_argument():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megl.models.sdtg import greedy_generate

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2))
    x, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ids = greedy_generate(llm, llm.model.embed_tokens, x, mask, torch.arange(3).expand(2, 3), 4, eos=-1)
    # the same tokens as decoding without a cache: the cache is really used, not dropped
    seq = x
    for step in range(4):
        nxt = llm(inputs_embeds=seq, use_cache=False).logits[:, -1].argmax(-1)
        assert [row[step] for row in ids] == nxt.tolist()
        seq = torch.cat([seq, llm.model.embed_tokens(nxt)[:, None]], 1)
