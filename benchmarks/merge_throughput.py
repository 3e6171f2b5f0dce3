"""Throughput and memory of ``merge run`` against the I/O floor.

Builds synthetic Llama-architecture checkpoints (a base and two variants; default the
shapes of SmolLM2-135M, 135M parameters in bfloat16, ``--size 360m`` or ``1.7b`` for
larger), then for each method runs ``merge run --json`` in a fresh process and records
wall time, bytes moved, GB/s and the process's peak RSS. The *floor* is the same files
read tensor by tensor with ``safetensors.safe_open`` (copied into process memory) and
one output written with ``safetensors.torch.save_file``, no math, also in a fresh
process. ``wall s`` includes interpreter start-up and ``import torch`` for both.

Every run reads files that are in the page cache (a warm-up pass reads them first), so
the figures are CPU- and memory-bound, which is what the engine controls.

    python benchmarks/merge_throughput.py                 # 135M, 4 methods, 3 repeats
    python benchmarks/merge_throughput.py --size 360m --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads, tied)
    "135m": (49152, 576, 1536, 30, 9, 3, True),
    "360m": (49152, 960, 2560, 32, 15, 5, True),
    "1.7b": (49152, 2048, 8192, 24, 32, 32, True),
}

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n{models_weighted}\n",
    "slerp": (
        "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
        "parameters:\n  t: [0, 0.5, 1]\n"
    ),
    "ties": (
        "merge_method: ties\nbase_model: {base}\nmodels:\n"
        "  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    ),
    "dare_ties": (
        "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        "  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\nseed: 0\n"
    ),
}

FLOOR = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from safetensors import safe_open
    from safetensors.torch import save_file
    start = time.perf_counter()
    inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
    first, nread = {}, 0
    for i, folder in enumerate(inputs):
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    # clone: get_tensor may hand out a lazy view of the mmap; a merge has
                    # to bring the bytes into memory, so the floor must too
                    t = st.get_tensor(name).clone()
                    nread += t.numel() * t.element_size()
                    if i == 0:
                        first[name] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(first, out / "model.safetensors", metadata={"format": "pt"})
    nwritten = sum(t.numel() * t.element_size() for t in first.values())
    print(json.dumps({"seconds": time.perf_counter() - start, "bytes_read": nread,
                      "bytes_written": nwritten,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


def build_checkpoints(root: Path, size: str) -> dict[str, Path]:
    """Write base, a, b (bf16, single-file safetensors) unless already there."""
    from safetensors.torch import save_file

    vocab, hidden, inter, layers, heads, kv, tied = SIZES[size]
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    paths = {}
    for k, name in enumerate(["base", "a", "b"]):
        folder = root / size / name
        paths[name] = folder
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(100 + k)
        sd = {}
        for t_name, shape in shapes.items():
            w = torch.randn(shape, generator=gen) * 0.02
            if k:
                w += torch.randn(shape, generator=noise) * 0.002
            sd[t_name] = w.to(torch.bfloat16)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        del sd
    return paths


def run_json(cmd: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout), wall


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="135m")
    ap.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the best is kept")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / ".work")
    args = ap.parse_args()

    paths = build_checkpoints(args.workdir, args.size)
    merge = str(Path(sys.executable).parent / "merge")
    model_bytes = (paths["base"] / "model.safetensors").stat().st_size

    def floor() -> tuple[dict, float]:
        out = args.workdir / "out" / "floor"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        return run_json([sys.executable, "-c", FLOOR, *map(str, paths.values()), str(out)])

    floor()  # warm the page cache
    rows = []
    best_floor = min((floor() for _ in range(args.repeat)), key=lambda r: r[1])
    rows.append(("I/O floor", best_floor))
    for method in args.methods.split(","):
        recipe = args.workdir / f"{method}.yaml"
        weighted = "\n".join(
            f"  - model: {p}\n    parameters: {{weight: {w}}}"
            for p, w in zip(paths.values(), (0.2, 0.3, 0.5), strict=True)
        )
        recipe.write_text(
            RECIPES[method].format(
                base=paths["base"], a=paths["a"], b=paths["b"], models_weighted=weighted
            )
        )
        out = args.workdir / "out" / method
        runs = []
        for _ in range(args.repeat):
            runs.append(
                run_json([merge, "run", str(recipe), "-o", str(out), "--overwrite", "--json"])
            )
        rows.append((method, min(runs, key=lambda r: r[1])))

    cpu = platform.processor() or platform.machine()
    print(
        f"\nmerge throughput: synthetic Llama {args.size} bf16 "
        f"({model_bytes / 1e6:.0f} MB per model, 3 inputs), torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores ({cpu}), best of {args.repeat}\n"
    )
    print("| run | wall s | merge s | GB moved | GB/s (wall) | peak RSS GB | x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    floor_wall = best_floor[1]
    for name, (summary, wall) in rows:
        moved = (summary["bytes_read"] + summary["bytes_written"]) / 1e9
        print(
            f"| {name} | {wall:.2f} | {summary['seconds']:.2f} | {moved:.2f} | {moved / wall:.2f} "
            f"| {summary['peak_rss_bytes'] / 1e9:.2f} | {wall / floor_wall:.2f} |"
        )


if __name__ == "__main__":
    main()
