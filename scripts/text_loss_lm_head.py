"""Time the SDTG text loss (forward + backward) two ways on one batch: Hugging Face's `labels=` loss, whose LM head
runs on every position, and megl.models.llm.causal_lm_loss, which runs it on the labelled (rationale) positions only.
The batch has 16 + 64 visual tokens, as on DecoyMNIST's cnn; tiny random stand-ins; one thread.

    OMP_NUM_THREADS=1 python scripts/text_loss_lm_head.py 64
"""
import sys
import time

import torch

from megl.config import RANDOM_STANDINS, Config
from megl.data.synthetic import SyntheticConfig, make_splits
from megl.models import build_model
from megl.models.llm import causal_lm_loss
from megl.models.tokenizer import train_tokenizer

torch.set_num_threads(1)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
cfg = Config(image_size=64, resnet_stem_maxpool=False, **RANDOM_STANDINS)
syn = SyntheticConfig(n_train=B, n_val=0, n_test=0, image_size=64)
train = make_splits(syn, expand_train_rationales=False)["train"]
texts = [r for i in range(len(train)) for r in train[i]["references"]]
tok = train_tokenizer(texts, train.class_names, cfg.tokenizer_vocab_size)
model = build_model(cfg, train.class_names, tokenizer=tok)
model.train()
embed = model.llm.get_input_embeddings()
V = torch.randn(B, 16 + 64, embed.weight.shape[1], requires_grad=True)  # CLIP tokens + Z_I, as on DecoyMNIST's cnn
names = [train.class_names[train[i]["label"]] for i in range(B)]
rats = [train[i]["references"][0] for i in range(B)]
inputs, mask, labels = model.prompts.training_batch(embed, V, names, rats)
print("batch", tuple(inputs.shape), "labelled", int((labels != -100).sum()), "of", labels.numel())
f = {"hf": lambda: model.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss,
     "ours": lambda: causal_lm_loss(model.llm, inputs, mask, labels)}
t = {k: [] for k in f}
for _ in range(12):
    for k, fn in f.items():
        t0 = time.perf_counter()
        fn().backward(retain_graph=True)
        t[k].append(time.perf_counter() - t0)
for k, v in t.items():
    v = sorted(v)
    print(k, "min %.1f ms median %.1f ms" % (1e3 * v[0], 1e3 * v[len(v) // 2]))
