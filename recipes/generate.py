"""Sample text from a training checkpoint in one process (no torchrun), to see what the model learned.

    python recipes/generate.py --output-dir outputs/tiny --prompt "def " --max-new-tokens 300
    python recipes/generate.py --hf-dir outputs/qwen3-ft/hf   # an export of a transformers model

With ``--hf-dir`` the directory is loaded by transformers itself (``from_pretrained``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ep_fsdp  # noqa: E402
import ep_fsdp.checkpoint as ckpt  # noqa: E402
from train import build_model  # noqa: E402
from train_config import from_dict  # noqa: E402


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: bytes, max_new_tokens: int, temperature: float, top_k: int,
           seed: int) -> bytes:
    """Byte-level sampling (among the 256 byte values) with temperature and top-k; the context is cut
    to max_seq_len."""
    g = torch.Generator().manual_seed(seed)
    tokens = list(prompt) or [10]
    limit = getattr(model.config, "max_seq_len", None) or model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        x = torch.tensor([tokens[-limit:]])
        out = model(x)
        # [256]: the models are trained on bytes; a larger vocabulary's other ids are never targets
        logits = (out if isinstance(out, torch.Tensor) else out.logits)[0, -1, :256]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        tokens.append(nxt)
    return bytes(tokens)


def transformers_model(config: dict) -> torch.nn.Module:
    """The (plain, float32) transformers model of a checkpoint's recorded ``config.json`` content;
    its weights come from the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values),
                                            dtype=torch.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path)
    src.add_argument("--output-dir", type=Path, help="use the newest checkpoint of this training run")
    src.add_argument("--hf-dir", type=Path, help="a transformers model directory (e.g. from recipes/export.py)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.hf_dir is not None:
        from transformers import AutoModelForCausalLM

        if not (args.hf_dir / "config.json").is_file():  # (transformers would take the name for a hub repo)
            p.error(f"--hf-dir {args.hf_dir} is not a local model directory (no config.json); pass the directory "
                    "recipes/export.py wrote, e.g. outputs/qwen3-ft/hf")
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, local_files_only=True).eval()
        text = sample(model, args.prompt.encode(), args.max_new_tokens, args.temperature, args.top_k, args.seed)
        print(f"# {args.hf_dir} (transformers {type(model).__name__})")
        print(text.decode("utf-8", errors="replace"))
        return
    path = args.checkpoint or ckpt.latest(args.output_dir / "checkpoints")
    if path is None:
        p.error(f"no complete checkpoint under {args.output_dir / 'checkpoints'}")
    try:
        saved = ckpt.read_metadata(path, api="--checkpoint" if args.checkpoint else "--output-dir")
    except (OSError, ValueError) as e:  # not a checkpoint: said, not a traceback
        p.error(str(e))
    user = saved.get("user") or {}
    if saved.get("transformers"):  # a transformers model trained by train.py (model.hf_path)
        model = transformers_model(saved["transformers"]["config"])
    elif "train_config" in user:
        cfg = from_dict(user["train_config"])
        model = ep_fsdp.materialize(build_model(cfg), "cpu", seed=cfg.train.seed)  # weights come from the checkpoint
    else:
        p.error(f"{path} does not record the training config; it was not written by recipes/train.py")
    meta = ckpt.load(path, model)  # a plain model in one process: the checkpoint reshards to it
    model.eval()
    text = sample(model, args.prompt.encode(), args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(f"# {path} (step {meta['step']})")
    print(text.decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
