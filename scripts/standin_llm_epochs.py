"""How many epochs the tiny LLM stand-in needs: pretrain it (megl.models.pretrain.pretrain_llm) on the default data's
training split for each epoch count, then print its validation perplexity and what greedy decoding says for the
validation images (true class in the prompt), scored against their references. Used for LLM_EPOCHS
(docs/standins.md); reads the validation split only.

    OMP_NUM_THREADS=1 python scripts/standin_llm_epochs.py --epochs 3,10,20
"""
import argparse
import json

import torch

from megl import runs
from megl.config import Config
from megl.metrics import caption_metrics
from megl.models import pretrain as P
from megl.models import standins
from megl.models.conversation import PromptBuilder
from megl.models.llm import tiny_llama
from megl.models.sdtg import greedy_generate
from megl.models.tokenizer import train_tokenizer

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", default="3,10,20")
    ap.add_argument("--lr", type=float, default=P.LLM_LR)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = Config(clip_model="tiny", llm="tiny").validate()
    splits = runs.make_splits(cfg)
    train, val = splits["train"], splits["val"]
    tok = train_tokenizer([t for r in train.records for t in r.references], train.class_names, cfg.tokenizer_vocab_size)
    vis = standins.image_slot_tokens(cfg, splits)
    names = [train.class_names[r.label] for r in val.records]
    for epochs in (int(e) for e in args.epochs.split(",")):
        torch.manual_seed(cfg.seed)
        llm, proj = tiny_llama(cfg, tok), torch.nn.Linear(cfg.tiny_clip_width, cfg.tiny_llm_hidden)
        rep = P.pretrain_llm(llm, tok, train, train.class_names, visual=vis["train"], projector=proj, epochs=epochs,
                             lr=args.lr, seed=cfg.seed)
        ppl = P.perplexity(llm, tok, val, train.class_names, vis["val"], proj)
        prompts, embed = PromptBuilder(tok), llm.get_input_embeddings()
        with torch.no_grad():
            inputs, mask, pos = prompts.prompt_batch(embed, proj(vis["val"]), names)
            ids = greedy_generate(llm, embed, inputs, mask, pos, 40, prompts.eos)
        said = [tok.decode(i, skip_special_tokens=True).strip() for i in ids]
        m = caption_metrics(said, [r.references for r in val.records], spice="off")
        print(json.dumps({"epochs": epochs, "seconds": rep["seconds"], "val_perplexity": round(ppl, 3),
                          "distinct": len(set(said)), "bleu4": round(m["bleu4"], 3), "cider": round(m["cider"], 3),
                          "example": said[0]}), flush=True)
