"""Measure the CPU hardware preset's planner constants on this machine, one thread per process as the preset
runs (`OMP_NUM_THREADS=1`): the fp32 matmul rate (`peak_tflops`), the memory bandwidth an optimizer sweep
gets (`memory_gbps`), the fixed cost of one call of a pass (`op_latency_us`) and of the optimizer step per
parameter tensor (`optimizer_tensor_us`), and gloo's collectives between 2 processes on 127.0.0.1
(`collective_latency_us`, `intra_node_gbps`).

    OMP_NUM_THREADS=1 python bench/cpu_constants.py [--smoke] [--out FILE]  # writes bench/results/cpu_constants.json

- `peak_tflops`: the best rate of a 1024 x 1024 x 1024 fp32 matmul (torch.mm).
- `memory_gbps`: the best rate of an in-place `a += b` over 128 MiB tensors (two reads, one write per
  element: the shape of an optimizer's update).
- `op_latency_us`: the tiny recipe's own model (`recipes/tiny_cpu.yaml`), built, wrapped and stepped by the
  runtime's code in one process (`dpoc.runtime.train`: DDP, distributed optimizer, megatron-core's schedule,
  the CPU device bridge), at 1 and 9 layers on micro-batches of one pair of 8-token sequences, where the
  FLOPs cost nothing next to the calls. The extra layers' reference forward time per layer and
  micro-batch, divided by the calls the planner counts in a layer's forward
  (`throughput.layer_forward_calls`), is the cost of one call; the extra layers' optimizer step time, divided
  by their parameter tensors (`params.layer_tensors`), the optimizer's cost per tensor. The same runs give
  what the planner's other counts imply here (the layer's backward, the embedding, output layer and loss),
  printed next to the counts it uses to check them, not fitted.
- gloo: all-reduce, all-gather (into one tensor) and broadcast of fp32 messages from 4 B to 4 MiB between 2
  processes (`torch.multiprocessing`, a TCP rendezvous on 127.0.0.1), the best mean of rounds of calls. An
  op's latency is its time at 4 B; its bus bandwidth the extra bytes each rank moves from the smallest to
  the largest message over the extra time, in the convention the planner charges them
  (`collectives.moved_bytes`: an all-reduce moves 2 (p - 1) / p of the message, an all-gather (p - 1) / p of
  its output, a broadcast all of it). The preset takes the all-reduce's (the op the runtime issues most;
  `collective_latency_us`) and its bandwidth over the planner's `COMM_EFFICIENCY` (`intra_node_gbps`, the
  nominal link the planner derates). The same op on a 1-rank group (megatron-core issues those too) is
  timed for the record: the planner counts only groups of 2 or more.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402

from bench._shared import arguments, best_seconds, square_matmul_rate, write_result  # noqa: E402
from dpoc.common.ports import free_port  # noqa: E402
from dpoc.compiler.pipeline import build  # noqa: E402
from dpoc.contract import megatron_args  # noqa: E402
from dpoc.contract.specs import preset_hardware, preset_model  # noqa: E402
from dpoc.planner.collectives import moved_bytes  # noqa: E402
from dpoc.planner.layout import make_layout  # noqa: E402
from dpoc.planner.params import layer_tensors  # noqa: E402
from dpoc.planner.throughput import (  # noqa: E402
    BACKWARD_CALLS_PER_FORWARD_CALL,
    COMM_EFFICIENCY,
    DPO_LOSS_CALLS,
    EMBEDDING_CALLS,
    HEAD_CALLS,
    layer_forward_calls,
)
from dpoc.runtime.model import device as devices  # noqa: E402
from dpoc.runtime.model.gpt import transformer_config  # noqa: E402
from dpoc.runtime.step.data import collate  # noqa: E402
from dpoc.runtime.step.dpo import Objective  # noqa: E402
from dpoc.runtime.step.passes import policy_pass, reference_pass  # noqa: E402
from dpoc.runtime.step.session import build_models, build_optimizer, init_distributed, initialize_parallel  # noqa: E402
from dpoc.runtime.weights import weight_sources  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
LAYERS = (1, 9)
MICRO_BATCHES = 2  # as the tiny recipe runs them per rank and step
PROMPT, RESPONSE = 4, 4  # tokens of each synthetic sequence


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/cpu_constants.py", "dpoc/runtime", "dpoc/planner")


def memory_gbps(repeats: int) -> float:
    a, b = torch.zeros(32 * 2 ** 20), torch.ones(32 * 2 ** 20)  # 128 MiB each, past the caches
    return 3 * a.numel() * a.element_size() / best_seconds(lambda: a.add_(b), repeats) / 1e9


GLOO_BYTES = (4, 4 * 2**10, 64 * 2**10, 2**20, 4 * 2**20)  # message sizes (all-gather: its output)
GLOO_OPS = ("all_reduce", "all_gather", "broadcast")


def _gloo_call(op: str, message: torch.Tensor, group: dist.ProcessGroup | None) -> Callable[[], None]:
    size = dist.get_world_size(group)
    if op == "all_reduce":
        return lambda: dist.all_reduce(message, group=group)
    if op == "all_gather":
        shard = message[: message.numel() // size]
        return lambda: dist.all_gather_into_tensor(message, shard, group=group)
    return lambda: dist.broadcast(message, src=0, group=group)


def _gloo_worker(rank: int, port: int, repeats: int, calls: int, out: str) -> None:
    """One of the 2 processes: every op and size, `repeats` rounds of `calls` calls; rank 0 writes the best
    mean per call (seconds) as JSON, and the all-reduce's on a group of this rank alone."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    alone = [dist.new_group([r]) for r in range(2)][rank]
    times: dict[str, dict[str, float]] = {}
    for op, group in ((*GLOO_OPS[:1], alone), *((op, None) for op in GLOO_OPS)):
        key = f"{op}_1rank" if group is alone else op
        times[key] = {}
        for nbytes in GLOO_BYTES:
            call = _gloo_call(op, torch.ones(max(nbytes // 4, 2)), group)
            call()
            best = float("inf")
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                best = min(best, (time.perf_counter() - start) / calls)
            times[key][str(nbytes)] = best
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def gloo_constants(repeats: int) -> dict[str, Any]:
    """gloo's per-op latency and bus bandwidth between 2 processes on this machine (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        mp.spawn(_gloo_worker, args=(free_port(), repeats, 5 if repeats < 10 else 20, str(out)), nprocs=2)
        times = json.loads(out.read_text())
    small, large = GLOO_BYTES[0], GLOO_BYTES[-1]
    ops = {}
    for key, by_size in times.items():
        op = key.removesuffix("_1rank")
        ranks = 1 if key != op else 2
        extra = moved_bytes(op, large, ranks) - moved_bytes(op, small, ranks)
        spent = by_size[str(large)] - by_size[str(small)]
        ops[key] = {"seconds_by_bytes": by_size, "latency_us": by_size[str(small)] * 1e6,
                    "bus_gbps": extra / spent / 1e9 if ranks > 1 else None}
    reduce = ops["all_reduce"]
    return {"processes": 2, "ops": ops, "collective_latency_us": reduce["latency_us"],
            "bus_gbps": reduce["bus_gbps"], "intra_node_gbps": reduce["bus_gbps"] / COMM_EFFICIENCY}


def _pairs(count: int, vocab: int, seed: int) -> list[list[np.ndarray]]:
    """Synthetic pairs as the dataset yields them: (chosen ids, labels, rejected ids, labels), the prompt
    masked with -100."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pair = []
        for _side in range(2):
            ids = rng.integers(1, vocab, PROMPT + RESPONSE).astype(np.int64)
            labels = ids.copy()
            labels[:PROMPT] = -100
            pair += [ids, labels]
        out.append(pair)
    return out


def _best_s(works: dict[int, dict[str, Callable[[], None]]], repeats: int) -> dict[int, dict[str, float]]:
    """The fastest of `repeats` timed calls of each work after one warm-up, the works taking turns (so that a
    busy moment on a shared machine slows all of them alike, and the best time keeps the fixed costs)."""
    best = {n: dict.fromkeys(parts, float("inf")) for n, parts in works.items()}
    for round_ in range(repeats + 1):
        for n, parts in works.items():
            for part, work in parts.items():
                start = time.perf_counter()
                work()
                if round_:
                    best[n][part] = min(best[n][part], time.perf_counter() - start)
    return best


def step_parts(args_file: Path, layers: int) -> dict[str, Callable[[], None]]:
    """The reference pass, the policy pass and the optimizer step of a `layers`-layer copy of the recipe's
    model, `MICRO_BATCHES` one-pair micro-batches per step (process groups already joined)."""
    args = megatron_args.parse([f"@{args_file}"])
    args.num_layers = layers
    config = transformer_config(args, devices.select("cpu", "gloo"))
    policy, reference = build_models(args, config, weight_sources.sources(args, str(args_file)))
    optimizer, _ = build_optimizer(args, policy)
    config.no_sync_func = policy[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    objective = Objective.from_args(args)
    batches = [collate(_pairs(1, args.padded_vocab_size, seed), 1) for seed in range(MICRO_BATCHES)]
    for b in batches:
        b.step_mean_pairs = 1.0

    def reference_work() -> None:
        reference_pass(reference, batches)

    def policy_work() -> None:
        for chunk in policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        policy_pass(policy, batches, objective)

    def optimizer_work() -> None:
        optimizer.step()

    return {"reference_s": reference_work, "policy_s": policy_work, "optimizer_s": optimizer_work}


def latency_constants(repeats: int) -> dict[str, Any]:
    """The per-call cost from the layers' reference forward, and the call counts the runs imply elsewhere."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "build"
        build(RECIPE, ["hardware.devices_per_node=1", f"dataset.output_prefix={tmp}/data", f"run_dir={tmp}/run"],
              out=out)
        args_file = out / "megatron.args"
        device = devices.select("cpu", "gloo")
        init_distributed(device)
        with devices.running_on(device):  # as the runtime runs (its CPU bridge's cost included)
            initialize_parallel(megatron_args.parse([f"@{args_file}"]))
            runs = _best_s({n: step_parts(args_file, n) for n in LAYERS}, repeats)
    model = preset_model("tiny-qwen3")
    layout = make_layout(model, preset_hardware("cpu"), 2, {})
    layer_calls, layer_tensor_count = layer_forward_calls(model, layout), layer_tensors(model, layout).dense
    extra = LAYERS[1] - LAYERS[0]

    def per_layer(part: str) -> float:  # seconds per layer and micro-batch (the optimizer: per layer and step)
        per = MICRO_BATCHES if part != "optimizer_s" else 1
        return (runs[LAYERS[1]][part] - runs[LAYERS[0]][part]) / extra / per

    forward = per_layer("reference_s")
    call_s = forward / layer_calls
    backward = per_layer("policy_s") - forward
    head_reference = runs[LAYERS[0]]["reference_s"] / MICRO_BATCHES - LAYERS[0] * forward
    head_policy = runs[LAYERS[0]]["policy_s"] / MICRO_BATCHES - LAYERS[0] * (forward + backward)
    optimizer_per_tensor = per_layer("optimizer_s") / layer_tensor_count
    reference_head = EMBEDDING_CALLS + HEAD_CALLS
    policy_head = (EMBEDDING_CALLS + HEAD_CALLS + DPO_LOSS_CALLS) * (1 + BACKWARD_CALLS_PER_FORWARD_CALL)
    return {
        "runs": {str(n): r for n, r in runs.items()},
        "micro_batches": MICRO_BATCHES, "sequence_tokens": PROMPT + RESPONSE, "pairs_per_micro_batch": 1,
        "layer_forward_s": forward, "layer_forward_calls": layer_calls,
        "op_latency_us": call_s * 1e6,
        "implied_backward_calls_per_forward_call": backward / forward,
        "model_backward_calls_per_forward_call": BACKWARD_CALLS_PER_FORWARD_CALL,
        "implied_head_reference_calls": head_reference / call_s,
        "model_head_reference_calls": reference_head,
        "implied_head_policy_calls": head_policy / call_s,
        "model_head_policy_calls": policy_head,
        "optimizer_tensor_us": optimizer_per_tensor * 1e6,
        "optimizer_fixed_s": runs[LAYERS[0]]["optimizer_s"] - LAYERS[0] * per_layer("optimizer_s"),
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "cpu_constants").parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    repeats = 3 if args.smoke else 50
    peak, memory = square_matmul_rate(1024, repeats) / 1e12, memory_gbps(repeats)
    gloo = gloo_constants(repeats)
    latency = latency_constants(repeats)
    print(f"CPU constants at {torch.get_num_threads()} thread(s) (the machine may be shared: best of "
          f"{repeats}):")
    print(f"  peak_tflops   {peak:.4f}  (fp32 1024^3 matmul)")
    print(f"  memory_gbps   {memory:.2f}  (a += b over 128 MiB)")
    print(f"  op_latency_us {latency['op_latency_us']:.1f}  (a layer's reference forward: "
          f"{latency['layer_forward_s'] * 1e6:.0f} us for {latency['layer_forward_calls']} counted calls)")
    print(f"  optimizer_tensor_us {latency['optimizer_tensor_us']:.1f}  (the extra layers' optimizer step per "
          "parameter tensor)")
    for what in ("backward_calls_per_forward_call", "head_reference_calls", "head_policy_calls"):
        print(f"  {what:<33} implied {latency['implied_' + what]:6.1f}, planner counts {latency['model_' + what]}")
    print(f"  optimizer step beyond the layers' tensors {latency['optimizer_fixed_s'] * 1e3:.2f} ms (the embedding, "
          "final norm and head tensors, and a fixed cost the planner does not model)")
    print(f"  gloo, 2 processes: collective_latency_us {gloo['collective_latency_us']:.1f}, intra_node_gbps "
          f"{gloo['intra_node_gbps']:.2f} (all-reduce bus bandwidth {gloo['bus_gbps']:.2f} GB/s over "
          f"COMM_EFFICIENCY {COMM_EFFICIENCY})")
    for op, row in gloo["ops"].items():
        bandwidth = f", bus {row['bus_gbps']:.2f} GB/s" if row["bus_gbps"] is not None else ""
        print(f"    {op:<16} {row['latency_us']:7.1f} us at 4 B{bandwidth}; "
              + ", ".join(f"{int(n) // 1024 or n} {'KiB' if int(n) >= 1024 else 'B'} {t * 1e6:.0f} us"
                          for n, t in row["seconds_by_bytes"].items()))
    out = write_result(args, "cpu_constants", {"threads": torch.get_num_threads(), "repeats": repeats,
                                               "peak_tflops": peak, "memory_gbps": memory, "latency": latency,
                                               "gloo": gloo},
                       MEASURES)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
