"""Text metrics: equal to calling pycocoevalcap directly; SPICE / Java handling; no leaked Java processes."""
import os
import shutil
import subprocess

import pytest

from megl.metrics import text as text_metrics
from megl.metrics.text import caption_metrics, spice_status

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (apt-get install openjdk-17-jre-headless)")

PREDS = ["A red square is on the left.", "the cat sits on a mat", "two dogs play", ""]
REFS = [
    ["There is a red square on the left side.", "A red square, left."],
    ["A cat is sitting on the mat.", "the cat sat on the mat", "cat on mat"],
    ["Two dogs are playing in the park."],
    ["an empty answer still gets scored"],
]


def _java_children() -> list[int]:
    """Live (non-zombie) java processes whose parent is this test process."""
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[1] == me and fields[0] != "Z" and b"java" in cmd:
            found.append(int(pid))
    return found


def _direct(preds, refs):
    """pycocoevalcap as its own COCOEvalCap does it: tokenize gts and res, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    res = {i: res.get(i, [""]) for i in gts}   # a trailing empty hypothesis may come back missing
    meteor = Meteor()
    try:
        m = meteor.compute_score(gts, res)[0]
    finally:
        text_metrics._close_meteor(meteor)
    return {"bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "meteor": m,
            "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}


def test_caption_metrics_equal_direct_pycocoevalcap_and_close_java():
    with text_metrics.shared_meteor():  # one METEOR for both calls, as experiments uses it
        ours = caption_metrics(PREDS, REFS)
        assert caption_metrics(PREDS, REFS) == ours
    direct = _direct(PREDS, REFS)
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["n"] == 4 and 0 < ours["bleu4"] < 1 and 0 < ours["meteor"] < 1 and ours["cider"] > 0
    available, note = spice_status()
    if available:
        assert isinstance(ours["spice"], float)
    else:   # SPICE reported as unavailable, with how to enable it, and the rest still computed
        assert ours["spice"] is None and "get_stanford_models" in ours["spice_note"]
    assert _java_children() == []


class _FakeMeteor:
    """Stands for pycocoevalcap's Meteor: a live child process and a score, without Java's start-up."""
    started: list = []

    def __init__(self):
        self.meteor_p = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _FakeMeteor.started.append(self)

    def compute_score(self, gts, res):
        return 0.5, [0.5] * len(res)


def test_shared_meteor_starts_one_process_and_closes_it_when_the_block_ends(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module
    monkeypatch.setattr(meteor_module, "Meteor", _FakeMeteor)
    _FakeMeteor.started = []
    with text_metrics._meteor() as alone:  # outside a block: one process per call, closed after it
        pass
    assert alone.meteor_p.poll() is not None
    with text_metrics.shared_meteor():
        for _ in range(3):
            with text_metrics._meteor() as m:
                assert m.meteor_p.poll() is None
        with text_metrics.shared_meteor():  # a nested block leaves the process to the outer one
            with text_metrics._meteor():
                pass
        assert len(_FakeMeteor.started) == 2 and _FakeMeteor.started[1].meteor_p.poll() is None
    assert _FakeMeteor.started[1].meteor_p.poll() is not None
    with pytest.raises(RuntimeError, match="boom"), text_metrics.shared_meteor():
        with text_metrics._meteor():
            raise RuntimeError("boom")
    assert len(_FakeMeteor.started) == 3 and _FakeMeteor.started[2].meteor_p.poll() is not None


def test_perfect_rationales_score_one_and_missing_references_are_skipped():
    refs = [["the red square is on the left"], ["a blue circle at the top right"], []]
    out = caption_metrics(["The red square is on the left.", "a blue circle at the top right", "x"], refs,
                          spice="off")
    assert out["n"] == 2 and out["n_skipped_no_reference"] == 1
    assert out["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["meteor"] > 0.95
    assert out["spice"] is None and "off" in out["spice_note"]


def test_spice_status_names_missing_jars(monkeypatch, tmp_path):
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    monkeypatch.setattr(text_metrics, "_pycocoevalcap_dir", lambda: str(tmp_path))
    ok, note = spice_status()
    assert not ok and "stanford-corenlp-3.6.0.jar" in note and "get_stanford_models" in note
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / "spice" / "lib" / jar).touch()
    assert spice_status()[0]


def test_missing_java_says_what_to_install(monkeypatch):
    monkeypatch.setattr(text_metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="openjdk-17-jre-headless"):
        caption_metrics(["a"], [["a"]])
