"""Textual explainability: BLEU-4, METEOR, ROUGE-L, CIDEr and SPICE from pycocoevalcap (paper Table 3).

Generated and reference rationales are first tokenised by pycocoevalcap's PTB tokenizer (Stanford CoreNLP:
lower-cased, punctuation dropped), exactly as the COCO caption evaluation does; each generated rationale is
scored against all reference rationales of its image. The tokenizer, METEOR and SPICE run Java: every Java
process started here is waited for or killed before returning, or, inside a `shared_meteor()` block, when the
block ends.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Sequence

JAVA_HINT = ("Java was not found on PATH; pycocoevalcap's PTB tokenizer, METEOR and SPICE need a Java runtime. "
             "Install one (Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`) or evaluate without text "
             "metrics (`--no-text`).")


def check_java() -> str:
    """Path of `java`, or a RuntimeError that says what to install."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(JAVA_HINT)
    return java


def _pycocoevalcap_dir() -> str:
    import pycocoevalcap
    return list(pycocoevalcap.__path__)[0]


def spice_status() -> tuple[bool, str]:
    """(available, reason). SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap does not ship."""
    lib = os.path.join(_pycocoevalcap_dir(), "spice", "lib")
    missing = [j for j in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not os.path.exists(os.path.join(lib, j))]
    if missing:
        return False, (
            f"SPICE unavailable: {', '.join(missing)} not found in {lib}. To enable it, run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once with internet access (it downloads "
            "stanford-corenlp-full-2015-12-09.zip), or copy both jars from that zip into that folder.")
    return True, "SPICE available"


def _clean(text: str) -> str:
    # One line per sentence for the tokenizer; METEOR's stdio protocol uses '|||' as a separator.
    return re.sub(r"\s+", " ", text.replace("|||", " ")).strip()


def ptb_tokenize(groups: dict) -> dict:
    """pycocoevalcap's PTBTokenizer on {key: [str, ...]} -> {key: [tokenised str, ...]} (same counts)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    check_java()
    tokenized = PTBTokenizer().tokenize({k: [{"caption": _clean(c)} for c in v] for k, v in groups.items()})
    out, short = {}, []
    for k, v in groups.items():
        got = tokenized.get(k, [])
        if len(got) > len(v):
            raise RuntimeError(f"PTB tokenizer returned {len(got)} lines for the {len(v)} sentences of {k!r}")
        short += [c for c in v[len(got):]]
        out[k] = got + [""] * (len(v) - len(got))
    # The Java tokenizer may drop trailing empty lines (they tokenise to ""); anything else is misaligned.
    if any(_clean(c) for c in short):
        raise RuntimeError("PTB tokenizer returned fewer lines than sentences; tokenised text would be misaligned")
    return out


def _close_meteor(meteor) -> None:
    p = meteor.meteor_p
    try:
        if p.stdin and not p.stdin.closed:
            p.stdin.close()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdout, p.stderr):
            if f and not f.closed:
                f.close()


_SHARED_METEOR: list = []  # [Meteor or None] while a shared_meteor() block is open


@contextlib.contextmanager
def shared_meteor():
    """Within this block every caption_metrics call reuses one METEOR process.

    Starting METEOR loads its paraphrase table, seconds of Java per call; a table of several runs pays it once.
    The process is closed when the block ends, also on an exception.
    """
    if _SHARED_METEOR:  # nested: the outer block owns the process
        yield
        return
    _SHARED_METEOR.append(None)
    try:
        yield
    finally:
        meteor = _SHARED_METEOR.pop()
        if meteor is not None:
            _close_meteor(meteor)


@contextlib.contextmanager
def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor
    if _SHARED_METEOR:
        if _SHARED_METEOR[0] is None:
            _SHARED_METEOR[0] = Meteor()
        yield _SHARED_METEOR[0]
        return
    meteor = Meteor()
    try:
        yield meteor
    finally:
        _close_meteor(meteor)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    spice: str = "auto") -> dict:
    """Corpus BLEU-4, METEOR, ROUGE-L, CIDEr(-D) and SPICE of `predictions` against `references`.

    predictions[i] is scored against all of references[i]; items without any reference are skipped (and
    counted in "n_skipped_no_reference"). spice: "auto" (run when its CoreNLP jars are present), "off".
    Returns {"bleu4", "meteor", "rouge_l", "cider", "spice" (None when not run), "spice_note", "n", ...}.
    Values are pycocoevalcap's (fractions in [0, 1]; CIDEr unbounded).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if spice not in ("auto", "off"):
        raise ValueError(f"spice must be 'auto' or 'off', got {spice!r}")
    keep = [i for i, refs in enumerate(references) if any(_clean(r) for r in refs)]
    result: dict = {"n": len(keep), "n_skipped_no_reference": len(predictions) - len(keep)}
    if not keep:
        result.update(bleu4=None, meteor=None, rouge_l=None, cider=None, spice=None,
                      spice_note="no item has a reference rationale")
        return result

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # One tokenizer call for both sides (one Java start instead of two; tokenisation is per line).
    groups = {("ref", i): [r for r in references[i] if _clean(r)] for i in keep}
    groups.update({("res", i): [predictions[i]] for i in keep})
    tok = ptb_tokenize(groups)
    gts = {i: tok[("ref", i)] for i in keep}
    res = {i: tok[("res", i)] for i in keep}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result["bleu4"] = float(bleu[3])
    with _meteor() as meteor:
        result["meteor"] = float(meteor.compute_score(gts, res)[0])
    result["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    result["cider"] = float(Cider().compute_score(gts, res)[0])

    ok, note = spice_status() if spice == "auto" else (False, "SPICE off (spice='off')")
    result["spice"], result["spice_note"] = None, note
    if ok:
        from pycocoevalcap.spice.spice import Spice
        result["spice"] = float(Spice().compute_score(gts, res)[0])
    return result
