"""Memory of loading a hub-format transformers MoE model: ``ep_fsdp.hf.from_pretrained`` per rank
against transformers' own ``from_pretrained`` of the whole model, in the same run.

    torchrun --nproc-per-node 4 recipes/benchmarks/hf_load.py --dir /tmp/hf_load_bench

Rank 0 first writes a random Qwen3-MoE directory with ``save_pretrained`` (per-expert keys;
``--hidden``, ``--layers``, ``--experts`` set its size) unless it exists, in a subprocess. Then:

The model's code is imported before either measurement (its memory is not the load's).

* each rank runs ``ep_fsdp.hf.from_pretrained(dir, mesh)`` on (dp_shard, ep) = (world/ep, ep) and
  reports the bytes it read from the files and the bytes of tensors it holds (both counted by the
  loader), and the growth of its peak resident memory (``ru_maxrss``) during the call;
* a separate process measures the same growth for ``transformers.AutoModelForCausalLM.from_pretrained``.

Rank 0 prints one line per rank and the reference, with the ratios to the model's full size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ep_fsdp.launch import exit_process

ROOT = Path(__file__).resolve().parents[2]
_REFERENCE = """
import resource, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
with torch.device("meta"):  # imports the model's code first: its memory is not the load's
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_parts() -> dict[str, int]:
    """Current anonymous and file-backed resident bytes (Linux ``/proc/self/status``): safetensors
    maps the files, so the pages a rank reads count as file-backed until the OS drops them."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            parts[key] = int(value.split()[0]) * 1024
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--ep", type=int, default=0, help="default: the world size")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = args.ep or world
    if rank == 0 and not (args.dir / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "recipes" / "hf_tiny_model.py"), str(args.dir), "--family",
                        "qwen3_moe", "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--experts", str(args.experts)], check=True)
    dist.barrier()
    import ep_fsdp
    import ep_fsdp.hf

    mesh = ep_fsdp.build_mesh(ep=ep, device_type="cpu")
    reference = None
    if rank == 0:  # before this rank's own load, so its process is not the one measured
        out = subprocess.run([sys.executable, "-c", _REFERENCE, str(args.dir)], capture_output=True, text=True,
                             check=True)
        reference = int(out.stdout.strip().splitlines()[-1])
    dist.barrier()
    from transformers import AutoConfig

    ep_fsdp.hf._model.build_on_meta(AutoConfig.from_pretrained(args.dir), torch.float32)  # code imports
    before, parts_before = peak_rss_bytes(), rss_parts()
    model = ep_fsdp.hf.from_pretrained(args.dir, mesh)
    grown, parts_after = peak_rss_bytes() - before, rss_parts()
    stats = model.ep_fsdp_load_stats
    row = {"rank": rank, "read": stats.bytes_read, "held": stats.local_bytes, "full": stats.full_bytes,
           "rss_growth": grown, "full_reads": stats.full_reads,
           "anon_growth": parts_after["RssAnon"] - parts_before["RssAnon"],
           "file_growth": parts_after["RssFile"] - parts_before["RssFile"]}
    rows: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(rows, row)
    if rank == 0:
        mib = 2**20
        full = rows[0]["full"]
        print(f"hub directory {args.dir}: model {full / mib:.1f} MiB of tensors; world={world} "
              f"dp_shard={world // ep} ep={ep}")
        print(f"{'who':<28}{'read MiB':>10}{'held MiB':>10}{'peak RSS +MiB':>15}{'RSS / full':>12}"
              f"{'anon +MiB':>11}{'file +MiB':>11}")
        for r in rows:
            print(f"{'ep_fsdp.hf rank ' + str(r['rank']):<28}{r['read'] / mib:>10.1f}{r['held'] / mib:>10.1f}"
                  f"{r['rss_growth'] / mib:>15.1f}{r['rss_growth'] / full:>11.2f}x"
                  f"{r['anon_growth'] / mib:>11.1f}{r['file_growth'] / mib:>11.1f}")
        print(f"{'transformers (one process)':<28}{'':>10}{'':>10}{reference / mib:>15.1f}{reference / full:>11.2f}x")
        print(json.dumps({"full_bytes": full, "ranks": rows, "transformers_rss_growth": reference}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process()  # skips interpreter finalization (see ep_fsdp.launch.exit_process)
