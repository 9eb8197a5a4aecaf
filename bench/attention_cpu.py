"""Which form of causal attention is fastest on this CPU, forward + backward, fp32, one thread.

    python bench/attention_cpu.py [--rounds 7 --repeats 5 --out FILE.json]    # --smoke: one round, tiny shapes

Padded micro-batches [s, b, heads, d] (GQA 4 query heads on 2 groups):
  - local: megatron-core's DotProductAttention (the runtime's kernel before SDPA): scores and
    probabilities materialised, k/v repeated to every head;
  - sdpa causal: torch's scaled_dot_product_attention(is_causal=True, enable_gqa=True), what the runtime runs;
  - sdpa mask: the same with an explicit [s, s] boolean causal mask.
Packed streams [t, heads, d] of 16 sequences (what `--dpoc-packing` attends):
  - per sequence: one causal call per sequence on its slice of the stream (the runtime's form);
  - padded batch: all 16 laid out as [16, heads, longest, d], one causal call;
  - block mask: one call over the whole stream with a block-diagonal causal [t, t] mask.
Shapes: the tiny recipe's (head dim 16, sequences of 16-45 tokens) and the TRL benchmark's (head dim 64,
84-297 tokens). Variants alternate within each round; each keeps its best round (the machine is shared).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from bench._shared import arguments, write_result  # noqa: E402
from dpoc.runtime.model import device as devices  # noqa: E402
from dpoc.runtime.model.attention import PackedSequences, SdpaAttention  # noqa: E402

HEADS, GROUPS = 4, 2
SHAPES = {"tiny recipe": (16, (16, 45)), "TRL bench": (64, (84, 297))}  # head dim, sequence lengths


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/attention_cpu.py", "dpoc/runtime/model")


def _config(head_dim: int) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=HEADS * head_dim, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=head_dim, use_cpu_initialization=True)


def _qkv(tokens: int, head_dim: int, batch: int | None = None) -> list[torch.Tensor]:
    shape = (tokens,) if batch is None else (tokens, batch)
    return [torch.randn(*shape, heads, head_dim, requires_grad=True) for heads in (HEADS, GROUPS, GROUPS)]


def variants(head_dim: int, lengths: list[int]) -> dict[str, object]:
    """name -> a callable running one forward + backward."""
    config = _config(head_dim)
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    local = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    sdpa = SdpaAttention(config, 1, AttnMaskType.causal, "self", pg_collection=one_rank)
    micro = lengths[:4]  # one unpacked micro-batch: 2 pairs padded to their longest sequence
    padded = _qkv(max(micro), head_dim, batch=len(micro))
    causal = torch.ones(max(micro), max(micro), dtype=torch.bool).tril()
    stream = _qkv(sum(lengths), head_dim)
    packed = PackedSequences.of(tuple(lengths), 0)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    block = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()

    def bshd(q, k, v, **kw):
        out = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), enable_gqa=True, **kw)
        return out.permute(2, 0, 1, 3)

    def whole(q, k, v):
        return bshd(*(x.unsqueeze(1) for x in (q, k, v)), attn_mask=block).squeeze(1)

    def one_padded_batch(q, k, v):
        out = sdpa._attend(*(packed.rows(x).transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        return torch.cat([row[:n].reshape(n, -1) for row, n in zip(out, lengths, strict=True)])

    def step(fn, inputs):
        return lambda: fn(*inputs).sum().backward()

    return {
        "padded: local": step(lambda q, k, v: local(q, k, v, None), padded),
        "padded: sdpa causal": step(lambda q, k, v: sdpa(q, k, v, None), padded),
        "padded: sdpa mask": step(lambda q, k, v: bshd(q, k, v, attn_mask=causal), padded),
        "packed: per sequence": step(lambda q, k, v: sdpa(q, k, v, None, packed_seq_params=packed), stream),
        "packed: padded batch": step(one_padded_batch, stream),
        "packed: block mask": step(whole, stream),
    }


def measure(rounds: int, repeats: int, shapes: list[str]) -> dict[str, dict[str, float]]:
    results = {}
    rng = random.Random(0)
    for shape in shapes:
        head_dim, (low, high) = SHAPES[shape]
        lengths = [rng.randint(low, high) for _ in range(16)]
        runs = variants(head_dim, lengths)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for name, run in runs.items():
                run()  # warm
                started = time.perf_counter()
                for _ in range(repeats):
                    run()
                best[name] = min(best[name], (time.perf_counter() - started) / repeats)
        results[shape] = {"head_dim": head_dim, "lengths": lengths, "ms": {k: v * 1e3 for k, v in best.items()}}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], "attention_cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rounds, repeats = (1, 1) if args.smoke else (args.rounds, args.repeats)
    torch.set_num_threads(1)
    devices.select("cpu", "gloo")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    try:
        with devices.running_on(devices.Device("cpu", "gloo")):
            results = measure(rounds, repeats, list(SHAPES)[:1] if args.smoke else list(SHAPES))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    for shape, r in results.items():
        print(f"\n{shape}: head dim {r['head_dim']}, 16 sequences of {min(r['lengths'])}-{max(r['lengths'])} "
              f"tokens; ms per forward + backward (best of {rounds} rounds)")
        for name, ms in r["ms"].items():
            print(f"  {name:24s} {ms:9.3f}")
    write_result(args, "attention_cpu", {"rounds": rounds, "repeats": repeats, "threads": 1, "results": results},
                 MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
