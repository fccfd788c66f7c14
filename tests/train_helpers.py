"""Tiny configs for the training tests: a 2-layer ViT image tower, a 2-layer BERT text tower with a
small WordPiece vocabulary (saved to a temporary directory), digits at 16x16."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a an the of photo picture image scan drawing digit number numeral handwritten written by hand small "
         "blurry white black on background this is zero one two three four five six seven eight nine , .").split()

VIT = "{model_type: vit, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, " \
      "image_size: 16, patch_size: 4, hidden_dropout_prob: %s, attention_probs_dropout_prob: 0.0}"
BERT = "{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, " \
       "vocab_size: %d, max_position_embeddings: 32, hidden_dropout_prob: %s, attention_probs_dropout_prob: 0.0}"


def write_tokenizer(directory) -> str:
    from transformers import BertTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *letters, *("##" + c for c in letters)]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(directory))
    return str(directory)


def vocab_size() -> int:
    return 5 + len(set(WORDS)) + 52


def tiny_overrides(mode: str, output_dir, tokenizer_dir, *, steps: int = 3, batch: int = 8, dropout: float = 0.0,
                   samples: int = 64) -> list:
    """Dotted overrides of a few-step run of `mode` on `samples` digits with tiny towers."""
    out = [f"mode={mode}", f"output_dir={output_dir}", f"model.image_tower_config={VIT % dropout}",
           "model.projection_dim=16", "data.image_size=16", f"train.batch_size={batch}", f"train.max_steps={steps}",
           "train.log_every=1", f"data.max_samples={samples}", "eval.max_samples=30", "train.progress=false",
           "optim.warmup_steps=1", "seed=3", "eval.knn_train_samples=200"]
    if mode in ("clip", "clip+simclr", "siglip"):
        out += [f"model.text_tower_config={BERT % (vocab_size(), dropout)}", f"model.tokenizer={tokenizer_dir}"]
    if mode not in ("clip", "siglip"):
        out += ["data.augment=simclr"]
    if mode in ("moco", "pcl"):
        out += ["moco.queue_size=24", "model.projection=mlp"]
    if mode == "pcl":
        out += ["pcl.num_clusters=[4,6]"]
    if mode == "byol":
        out += ["model.projection=mlp", "byol.predictor_hidden=32"]
    return out


def recipe_overrides(mode: str, output_dir, tokenizer_dir, **kw) -> list:
    """tiny_overrides that also clear what the recipe YAMLs set for their real towers."""
    return tiny_overrides(mode, output_dir, tokenizer_dir, **kw) + [
        "model.text_tower=null", "model.lock_text=false", "model.cache_text_features=false",
        "model.image_mean=null", "model.image_std=null", "data.augment_on_device=null"]


def run_python(args, timeout=240, env_extra=None):
    """Run `python args...` from the repository root, offline; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
