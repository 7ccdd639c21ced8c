"""The paths a user with real weights runs first, run here end to end through the CLIs with small local stand-ins:
an LLM directory (`from_pretrained`, its own tokenizer), an open_clip architecture with a weights file
(`create_model(name, pretrained=FILE)`), and a torchvision state dict for the classifier."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megl import runs
from megl.evaluate import main as evaluate
from megl.predict import main as predict
from megl.train import main as train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_SETS  # noqa: E402

CLIP_NAME = "megl-test-tiny-vit"  # registered below; the same code path as "ViT-L-14"


def _train(out: Path, *sets: str) -> None:
    args = ["--out", str(out), "--no-progress", "--epochs", "1", "--set", "max_steps_per_epoch=1",
            "--set", "max_new_tokens=3"]
    assert train(args + [x for s in [*TINY_SETS, *sets] for x in ("--set", s)]) == 0


def _image(path: Path) -> str:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A Llama directory as a user downloads one: config, weights and tokenizer, all from save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megl.config import Config
    from megl.models.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("llama")
    splits = runs.make_splits(Config(image_size=32, synthetic={"n_train": 16, "n_val": 6, "n_test": 6,
                                                                "num_classes": 3}))
    tok = train_tokenizer([t for r in splits["train"].records for t in r.references], splits["train"].class_names, 300)
    tok.save_pretrained(d)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_llm_from_a_directory_trains_evaluates_and_predicts(llm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, f"llm={llm_dir}")
    assert not (run / "tokenizer").exists()  # the LLM's own tokenizer is used
    loaded = runs.load_run(run)
    lora = {k: v for k, v in loaded.model.checkpoint_state_dict().items() if "lora_B" in k}
    assert lora and any(float(v.abs().sum()) > 0 for v in lora.values())  # its adapters trained
    base = json.loads((llm_dir / "config.json").read_text())
    assert loaded.model.llm.get_base_model().config.hidden_size == base["hidden_size"] == 32
    assert evaluate(["--run", str(run), "--no-faithfulness", "--limit", "4", "--quiet"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert len(metrics["rationales"]) == 4 and "clipscore" in metrics
    capsys.readouterr()
    assert predict(["--run", str(run), "--out", str(tmp_path / "pred"), _image(tmp_path / "x.png")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert isinstance(row["rationale"], str) and Path(row["overlay"]).is_file()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    (d / f"{CLIP_NAME}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(d / f"{CLIP_NAME}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(CLIP_NAME)
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d / "open_clip_pytorch_model.bin", model.state_dict()


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.manual_seed(2)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, path)
    return path, sd


def test_open_clip_weights_and_classifier_weights_are_loaded(clip_file, resnet_file, tmp_path, capsys):
    (clip_path, clip_sd), (resnet_path, resnet_sd) = clip_file, resnet_file
    run = tmp_path / "run"
    # lr=0: the loaded classifier weights are still exactly the file's after a training step
    _train(run, f"clip_model={CLIP_NAME}", f"clip_weights={clip_path}", f"classifier_weights={resnet_path}", "lr=0")
    model = runs.load_run(run).model
    for k in ("conv1.weight", "visual.proj", "positional_embedding"):
        name = f"visual.{k}" if k == "conv1.weight" else k
        assert torch.equal(model.clip.state_dict()[name], clip_sd[name]), name
    for k in ("conv1.weight", "layer3.1.conv2.weight"):
        assert torch.equal(model.classifier.net.state_dict()[k], resnet_sd[k]), k
    assert evaluate(["--run", str(run), "--no-faithfulness", "--limit", "3", "--quiet"]) == 0
    assert predict(["--run", str(run), "--out", str(tmp_path / "pred"), _image(tmp_path / "x.png")]) == 0


def test_weights_of_the_wrong_model_are_one_line(resnet_file, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(SystemExit, match=r"^megl.train: error: .*wrong.pth.*resnet18") as e:
        _train(tmp_path / "run", f"classifier_weights={wrong}")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # the refused run leaves nothing, so the fixed command can reuse --out
    with pytest.raises(SystemExit, match=r"^megl.train: error: .*clip_weights"):
        _train(tmp_path / "run2", f"clip_model={CLIP_NAME}", f"clip_weights={wrong}")


def test_an_llm_directory_without_weights_is_one_line(llm_dir, tmp_path):
    import shutil

    broken = tmp_path / "llama"
    shutil.copytree(llm_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(SystemExit, match=r"^megl.train: error: llm=.*llama.* does not load") as e:
        _train(tmp_path / "run", f"llm={broken}")
    assert "\n" not in str(e.value)
