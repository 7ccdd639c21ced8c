"""How many epochs the tiny LLM stand-in needs: pretrain it (megl.models.pretrain.pretrain_llm) on the default data's
training split for each epoch count, then print its validation perplexity and what greedy decoding says for the
validation images (true class in the prompt), scored against their references. Used for LLM_EPOCHS
(docs/standins.md); reads the validation split only.

Whether the LLM reads its image slot: the perplexity with the slot of another image (`val_perplexity_shuffled`),
and how often the greedy rationale names the image's true position and shape (`where_acc`, `shape_acc`; the
most frequent position's share is `where_majority`). `--probe` first prints what a linear probe trained on the
training split reads from the slot's CLIP tokens on val: what an LLM could read at best. `--masked-only`
pretrains on the annotated training images alone, whose slot shows I ⊙ A as at validation and in MEGL (the
others' slot shows the whole image), for as many steps as the whole split takes (`llm_pretrain_images=masked`).
`--quick` uses the data of `megl.experiments --quick` (Table 2 / 4), `--seeds` repeats each row per seed.
`--choice` adds a forced choice free of what greedy decoding prefers: one reference per image, written out with
each of the nine position phrases, the lowest NLL given the slot wins (`where_choice` on val with the image's own
slot, `_shuffled` with another image's, `_train` on the first 100 training images: memorised or read?).

    OMP_NUM_THREADS=1 python scripts/standin_llm_epochs.py --epochs 3,10,20 [--probe] [--masked-only] [--quick]
"""
import argparse
import json

import torch
import torch.nn.functional as F

from megl import runs
from megl.config import Config
from megl.data.synthetic import COLOURS, SHAPES, WHERE
from megl.experiments import QUICK
from megl.metrics import caption_metrics
from megl.models import pretrain as P
from megl.models import standins
from megl.models.conversation import RATIONALE_QUESTIONS, PromptBuilder
from megl.models.llm import tiny_llama
from megl.models.sdtg import greedy_generate
from megl.models.tokenizer import train_tokenizer

POSITIONS = [w for row in WHERE for w in row]


def named(text, options):
    """The longest of `options` that `text` contains (None if none)."""
    hits = [o for o in options if o in text]
    return max(hits, key=len) if hits else None


def labels(split, key, options):
    return torch.tensor([options.index(r.meta[key]) for r in split.records])


def probe(tokens, split_labels, val_tokens, val_labels, classes, steps=300):
    """Validation accuracy of a linear classifier on the flattened, standardised slot tokens."""
    x, xv = tokens.flatten(1), val_tokens.flatten(1)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mu) / sd, (xv - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(x), split_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return round(float((lin(xv).argmax(1) == val_labels).float().mean()), 3)


@torch.no_grad()
def position_choice(llm, tok, proj, split, vis, question, perm=None, limit=None):
    """Share of images whose true position phrase, among the nine, gives their reference the lowest NLL."""
    prompts, embed = PromptBuilder(tok, question), llm.get_input_embeddings()
    right = 0
    records = split.records[:limit]
    for i, r in enumerate(records):
        ref = next(t for t in r.references if r.meta["where"] in t)
        cands = [ref.replace(r.meta["where"], w) for w in POSITIONS]
        j = i if perm is None else int(perm[i])
        inputs, mask, lab = prompts.training_batch(embed, proj(vis[j:j + 1]).expand(len(cands), -1, -1),
                                                   [split.class_names[r.label]] * len(cands), cands)
        logits = llm(inputs_embeds=inputs, attention_mask=mask).logits[:, :-1].float()
        target = lab[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none") * (target >= 0)
        right += POSITIONS[int(nll.sum(1).argmin())] == r.meta["where"]
    return round(right / len(records), 3)


def report(args, seed):
    data = {"synthetic": QUICK["synthetic"]} if args.quick else {}
    cfg = Config.from_dict({**Config().to_dict(), **data, "seed": seed}).validate()
    splits = runs.make_splits(cfg)
    train, val = splits["train"], splits["val"]
    tok = train_tokenizer([t for r in train.records for t in r.references], train.class_names, cfg.tokenizer_vocab_size)
    vis = standins.image_slot_tokens(cfg, splits)
    names = [train.class_names[r.label] for r in val.records]
    truth = {k: [r.meta[k] for r in val.records] for k in ("where", "shape", "colour")}
    majority = round(max(truth["where"].count(w) for w in POSITIONS) / len(val.records), 3)
    if args.probe:
        probes = {f"probe_{k}": probe(vis["train"], labels(train, k, o), vis["val"], labels(val, k, o), len(o))
                  for k, o in (("where", POSITIONS), ("shape", list(SHAPES)))}
        print(json.dumps(probes | {"where_majority": majority}), flush=True)
    images = train.has_masks.tolist() if args.masked_only else None
    question = RATIONALE_QUESTIONS[args.prompt]
    for epochs in (int(e) for e in args.epochs.split(",")):
        torch.manual_seed(cfg.seed)
        llm, proj = tiny_llama(cfg, tok), torch.nn.Linear(cfg.tiny_clip_width, cfg.tiny_llm_hidden)
        rep = P.pretrain_llm(llm, tok, train, train.class_names, visual=vis["train"], projector=proj, epochs=epochs,
                             lr=args.lr, seed=cfg.seed, images=images, question=question)
        ppl = P.perplexity(llm, tok, val, train.class_names, vis["val"], proj, question=question)
        other = torch.randperm(len(vis["val"]), generator=torch.Generator().manual_seed(1))
        ppl_shuffled = P.perplexity(llm, tok, val, train.class_names, vis["val"][other], proj, question=question)
        prompts, embed = PromptBuilder(tok, question), llm.get_input_embeddings()
        with torch.no_grad():
            inputs, mask, pos = prompts.prompt_batch(embed, proj(vis["val"]), names)
            ids = greedy_generate(llm, embed, inputs, mask, pos, 40, prompts.eos)
        said = [tok.decode(i, skip_special_tokens=True).strip() for i in ids]
        m = caption_metrics(said, [r.references for r in val.records], spice="off")
        acc = {k: round(sum(named(t, o) == v for t, v in zip(said, truth[k])) / len(said), 3)
               for k, o in (("where", POSITIONS), ("shape", SHAPES), ("colour", COLOURS))}
        choice = {}
        if args.choice:
            choice = {"where_choice": position_choice(llm, tok, proj, val, vis["val"], question),
                      "where_choice_shuffled": position_choice(llm, tok, proj, val, vis["val"], question, other),
                      "where_choice_train": position_choice(llm, tok, proj, train, vis["train"], question, limit=100)}
        print(json.dumps({"seed": seed, "epochs": rep["epochs"], "images": rep["images"], "seconds": rep["seconds"],
                          "val_perplexity": round(ppl, 3),
                          "val_perplexity_shuffled": round(ppl_shuffled, 3), "where_acc": acc["where"],
                          "where_majority": majority, "shape_acc": acc["shape"], "colour_acc": acc["colour"],
                          "distinct": len(set(said)), "bleu4": round(m["bleu4"], 3), "cider": round(m["cider"], 3),
                          "example": said[0]} | choice), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", default="3,10,20")
    ap.add_argument("--lr", type=float, default=P.LLM_LR)
    ap.add_argument("--probe", action="store_true", help="linear probes of position and shape on the slot tokens")
    ap.add_argument("--choice", action="store_true", help="forced choice of the position phrase (val, train)")
    ap.add_argument("--masked-only", action="store_true", help="pretrain on the annotated training images only")
    ap.add_argument("--quick", action="store_true", help="the data of megl.experiments --quick")
    ap.add_argument("--prompt", default="label", choices=sorted(RATIONALE_QUESTIONS),
                    help="SDTG's question (config.rationale_prompt): with `image` it does not name the class")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (data stay those of data_seed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for seed in (int(s) for s in args.seeds.split(",")):
        report(args, seed)
