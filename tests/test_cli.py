"""The `mmcl` command: run as a subprocess (the installed console script) for the main paths and
the error paths, and in-process through `mmcl.cli.main` for the rest (each subprocess pays
seconds of imports). Results are checked against transformers' own model and scikit-learn."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tiny_dual_encoder import CLASS_NAMES, build_tiny_vtde, real_images, reference_features

from mmcl.cli import main

MMCL = Path(sys.executable).with_name("mmcl")


def run_mmcl(*args, timeout=240):
    cmd = [str(MMCL)] if MMCL.exists() else [sys.executable, "-m", "mmcl.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf_model, hf_processor = build_tiny_vtde(str(root / "model"))
    images = real_images(12)
    files = []
    for i, im in enumerate(images[:3]):
        files.append(root / f"img{i}.png")
        im.save(files[-1])
    labels = [(3 * i) % 7 for i in range(12)]
    # One or two captions per image, all distinct, so the reference ranks below have no ties.
    prompts = [t.replace("{}", name) for t in ("a photo of the {}", "itap of a {}", "art of the {}", "a bad photo of a {}")
               for name in CLASS_NAMES]
    captions = [prompts[2 * i : 2 * i + 1 + i % 2] for i in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES),
                                  "captions": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, "captions": captions}, features=features)
    ds.to_parquet(str(root / "data.parquet"))
    datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 12))}).save_to_disk(str(root / "saved"))
    feats = reference_features(hf_model, hf_processor, images=images)
    return dict(root=root, model=root / "model", files=files, ds=ds, hf_model=hf_model, hf_processor=hf_processor,
                ref_feats=feats)


def _one_line_error(result, fragment):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcl: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_zeroshot_command_matches_transformers(setup):
    names = CLASS_NAMES[:4]
    res = run_mmcl("zeroshot", "--model", setup["model"], "--labels", ",".join(names), "--templates", "none",
                   "--top", "3", "--json", "--quiet", *setup["files"])
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    images = [im.convert("RGB") for im in real_images(12)[:3]]
    inputs = setup["hf_processor"](text=names, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = setup["hf_model"](**inputs).logits_per_image.softmax(dim=-1)
    for row, path, probs in zip(rows, setup["files"], expected):
        assert row["image"] == str(path)
        top = probs.topk(3)
        assert row["labels"] == [names[i] for i in top.indices.tolist()]
        np.testing.assert_allclose(row["probs"], top.values.numpy(), atol=1e-5)


@pytest.mark.slow
def test_error_paths_are_one_line_with_status_2(setup, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    _one_line_error(run_mmcl("zeroshot", "--model", setup["model"], "--labels", "cat", bad), "cannot read image")
    _one_line_error(run_mmcl("eval", "knn", "--model", tmp_path / "no_model", "--data", "digits"),
                    "no such directory")
    # The same reporting in-process, where each further case costs no interpreter start.
    for argv, fragment in [
        (["zeroshot", "--model", str(setup["model"]), "--labels", " , ,", str(setup["files"][0])], "label list is empty"),
        (["zeroshot", "--model", str(setup["model"]), "--labels", "a", str(tmp_path / "nope.jpg")], "image file not found"),
        (["eval", "zeroshot", "--model", str(setup["model"]), "--data", str(tmp_path / "nope.parquet")],
         "does not exist (no such file or directory)"),
        (["eval", "retrieval", "--model", str(setup["model"]), "--data", str(setup["root"] / "saved"),
         "--split", "dev"], "'dev' does not exist; available splits: ['train', 'test']"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmcl: error:") and fragment in err[0], (argv, err)


def test_eval_retrieval_in_process_and_plot(setup, tmp_path, capsys):
    plot = tmp_path / "sim.png"
    assert main(["eval", "retrieval", "--model", str(setup["model"]), "--data", str(setup["root"] / "data.parquet"),
                 "--plot", str(plot), "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    texts = [t for caps in setup["ds"]["captions"] for t in caps]
    owner = [i for i, caps in enumerate(setup["ds"]["captions"]) for _ in caps]
    text_feats = reference_features(setup["hf_model"], setup["hf_processor"], texts=texts)
    sim = (setup["ref_feats"] @ text_feats.T).numpy()
    for k in (1, 5, 10):  # recall written out over the float64 reference similarities
        i2t = np.mean([min(np.sum(sim[i] > sim[i, j]) for j in range(len(texts)) if owner[j] == i) < k
                       for i in range(sim.shape[0])])
        t2i = np.mean([np.sum(sim[:, j] > sim[owner[j], j]) < k for j in range(len(texts))])
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t), k
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i), k
    assert got["num_texts"] == len(texts)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_eval_zeroshot_in_process(setup, tmp_path, capsys):
    plot = tmp_path / "cm.png"
    rc = main(["eval", "zeroshot", "--model", str(setup["model"]), "--data", str(setup["root"] / "data.parquet"),
               "--templates", "none", "--plot", str(plot), "--json", "--quiet", "--batch-size", "5"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    images = [im.convert("RGB") for im in real_images(12)]
    inputs = setup["hf_processor"](text=CLASS_NAMES, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = setup["hf_model"](**inputs).logits_per_image
    labels = torch.tensor(setup["ds"]["label"])
    assert got["top1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    top5 = logits.topk(5, dim=1).indices
    assert got["top5"] == pytest.approx((top5 == labels[:, None]).any(1).double().mean().item())
    assert plot.stat().st_size > 0


def test_eval_knn_and_linear_in_process(setup, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    feats, y = setup["ref_feats"].numpy(), np.array(setup["ds"]["label"])
    saved = str(setup["root"] / "saved")  # train = rows 0-7, test = rows 8-11
    assert main(["eval", "knn", "--model", str(setup["model"]), "--data", saved, "--k", "5", "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = KNeighborsClassifier(5, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.1))
    expected = ref.fit(feats[:8], y[:8]).score(feats[8:], y[8:])
    assert (got["top1"], got["num_train"], got["num_test"]) == (pytest.approx(expected), 8, 4)

    # A single-file source: the command holds out 20% with datasets' seeded split.
    assert main(["eval", "linear", "--model", str(setup["model"]), "--data", str(setup["root"] / "data.parquet"),
                 "--C", "3.0", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert "holding out 20%" in captured.err
    idx = datasets.Dataset.from_dict({"i": list(range(12))}).train_test_split(test_size=0.2, seed=0, shuffle=True)
    tr, te = idx["train"]["i"], idx["test"]["i"]
    fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    expected = LogisticRegression(C=3.0, max_iter=1000, random_state=0).fit(fn[tr], y[tr]).score(fn[te], y[te])
    assert got["top1"] == pytest.approx(expected)


def test_embed_and_export_in_process(setup, tmp_path, capsys):
    import pyarrow.parquet as pq
    from transformers import VisionTextDualEncoderModel

    model = str(setup["model"])
    assert main(["embed", "--model", model, "--out", str(tmp_path / "e.npy"), "--quiet", *map(str, setup["files"])]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), setup["ref_feats"][:3].numpy(), atol=1e-5)
    assert main(["embed", "--model", model, "--data", str(setup["root"] / "data.parquet"),
                 "--out", str(tmp_path / "e.parquet"), "--quiet", "--batch-size", "5"]) == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table["id"].to_pylist() == [str(i) for i in range(12)]
    np.testing.assert_allclose(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                               setup["ref_feats"].numpy(), atol=1e-5)
    assert main(["embed", "--model", model, "--out", str(tmp_path / "e.txt"), "--text", "cat"]) == 2
    assert "must end in .npy or .parquet" in capsys.readouterr().err

    out = tmp_path / "exported"
    assert main(["export", "--model", model, "--to", "transformers", str(out)]) == 0
    exported = VisionTextDualEncoderModel.from_pretrained(str(out)).eval()
    for name, param in setup["hf_model"].state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], param, msg=name)
    assert main(["export", "--model", model, "--to", "transformers", str(out)]) == 2  # not empty: refuse
    assert "not empty" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("zeroshot", "eval", "embed", "export", "examples:"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["eval", "knn", "--help"])
    assert "--temperature" in capsys.readouterr().out


# Builds the parser and prints every command's help in a fresh interpreter, then reports which
# heavy packages got loaded on the way.
_HELP_IMPORTS = """
import contextlib, io, json, sys
from mmcl.cli import main
codes = {}
for argv in (["--help"], ["zeroshot", "--help"], ["eval", "knn", "--help"], ["embed", "--help"],
             ["export", "--help"], ["shards", "--help"], ["index", "--help"], ["search", "--help"],
             ["checkpoint", "verify", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as stop:
            codes[" ".join(argv)] = [stop.code, "usage: mmcl" in out.getvalue()]
heavy = ("torch", "torchvision", "transformers", "datasets", "accelerate", "triton", "open_clip")
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
import mmcl  # the public names and subpackages still load on first use
public = mmcl.losses.clip_loss is mmcl.clip_loss and callable(mmcl.distributed.any_rank) and "DualEncoder" in dir(mmcl)
print(json.dumps({"codes": codes, "loaded": loaded, "public": public}))
"""


@pytest.mark.slow  # fresh interpreters
def test_help_loads_the_parser_only():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", _HELP_IMPORTS], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] and all(v == [0, True] for v in report["codes"].values()), report["codes"]
    assert report["loaded"] == [], f"`mmcl --help` imported {report['loaded']}"
    assert report["public"]
    for cmd in ([sys.executable, "-m", "mmcl", "--help"], [str(MMCL), "eval", "--help"]):
        if Path(cmd[0]).exists():
            shown = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            assert shown.returncode == 0 and shown.stdout.startswith("usage: mmcl"), shown


def test_checkpoint_verify_command(tmp_path, capsys):
    """`mmcl checkpoint verify` on a run directory, its checkpoints/ folder and one step_* directory:
    intact ones are ok (status 0); one changed byte (same size) makes that checkpoint DAMAGED and the
    status 2; a directory without checkpoints is a one-line error."""
    from mmcl.train import checkpoint as ckpt

    run = tmp_path / "run"
    model = torch.nn.Linear(5, 3)
    for step in (3, 7):
        tmp = ckpt.begin_checkpoint(run, step)
        ckpt.finish_checkpoint(tmp, run, step, model, {}, {"step": step, "lr": torch.arange(4.0)}, keep=5)
    for target in (run, run / "checkpoints", ckpt.checkpoint_dir(run, 3)):
        assert main(["checkpoint", "verify", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.count("step_00000003: ok") == 3 and out.count("step_00000007: ok") == 2, out
    assert "sizes and sha256 verified" in out

    weights = ckpt.checkpoint_dir(run, 7) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["checkpoint", "verify", str(run)]) == 2
    captured = capsys.readouterr()
    assert "step_00000003: ok" in captured.out, captured.out
    assert "step_00000007: DAMAGED: model.safetensors does not match its recorded sha256" in captured.out, captured.out
    assert captured.err.strip() == "mmcl: error: 1 of 2 checkpoints are damaged: step_00000007", captured.err
    assert main(["checkpoint", "verify", str(ckpt.checkpoint_dir(run, 3))]) == 0
    assert main(["checkpoint", "verify", str(tmp_path)]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_index_and_search_in_process(setup, tmp_path, capsys):
    pytest.importorskip("faiss", reason="mmcl index/search need faiss-cpu")
    model = str(setup["model"])
    emb = tmp_path / "e.parquet"
    assert main(["embed", "--model", model, "--data", str(setup["root"] / "data.parquet"), "--out", str(emb),
                 "--quiet"]) == 0
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--model", model, "--image", str(setup["files"][1]),
                 "--text", "a photo of the dog", "--k", "4", "--json", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    text_query = reference_features(setup["hf_model"], setup["hf_processor"], texts=["a photo of the dog"])
    for result, query in zip(results, [text_query[0], setup["ref_feats"][1]]):  # texts are searched first
        cos = setup["ref_feats"] @ query
        assert result["ids"] == [str(i) for i in cos.topk(4).indices.tolist()]
        np.testing.assert_allclose(result["scores"], cos.topk(4).values.numpy(), atol=1e-5)
    assert results[1]["ids"][0] == "1"  # an indexed image finds itself first
    assert main(["search", "--index", str(tmp_path), "--model", model, "--text", "x"]) == 2
    assert "is not an mmcl embedding index" in capsys.readouterr().err
