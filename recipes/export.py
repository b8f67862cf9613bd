"""Export a training checkpoint to a Hugging Face-style safetensors directory (one process).

    python recipes/export.py --output-dir outputs/tiny --out outputs/tiny/hf     # newest checkpoint
    python recipes/export.py --checkpoint outputs/tiny/checkpoints/step_00000300 --out hf_dir

Writes the sharded *.safetensors files, model.safetensors.index.json and config.json: the
training config the checkpoint was made with, or, for a transformers model (model.hf_path), the
model's transformers config (then the training config goes to train_config.json), so that
transformers.AutoModelForCausalLM.from_pretrained(out) loads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ep_fsdp.checkpoint as ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a checkpoint directory")
    src.add_argument("--output-dir", type=Path, help="a training output dir: export its newest checkpoint")
    p.add_argument("--out", type=Path, required=True, help="directory to create")
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    args = p.parse_args()
    path = args.checkpoint or ckpt.latest(args.output_dir / "checkpoints")
    if path is None:
        p.error(f"no complete checkpoint under {args.output_dir / 'checkpoints'}")
    if not args.max_shard_gb > 0:
        p.error(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    try:
        out = ckpt.export_safetensors(path, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (OSError, ValueError) as e:  # not a checkpoint, or --out exists: said, not a traceback
        p.error(str(e))
    meta = ckpt.read_metadata(path)
    user = meta.get("user") or {}
    if "train_config" in user:
        name = "train_config.json" if meta.get("transformers") else "config.json"
        (out / name).write_text(json.dumps(user["train_config"], indent=1))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    print(f"exported {path} -> {out}: {len(index['weight_map'])} tensors, "
          f"{index['metadata']['total_size'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
