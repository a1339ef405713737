"""Does an unpack with streaming stores cost the reader that follows it? (CPU)

An unpack writes the engine's pages, and attention reads them next. Ordinary stores leave the
written lines in the caches (after reading each one first); streaming stores send them to memory
(no read, nothing evicted), so a reader that comes at once must fetch them back. This sweep times,
on a DRAM-resident pool of whole blocks (perf/pools.py, sized for every layer of the call's
chunks), for calls of growing size (one layer of one chunk up to every layer of 4 chunks):

  ordinary    unpack with ordinary stores
  streaming   unpack with streaming stores
  +read       the same unpack followed at once by a read of every page it wrote (a pack of the
              same slots and layers into another arena window), timed together

``streaming_gain`` = ordinary time / streaming time of the same repeat, alone and with the read;
above 1 streaming wins even for a reader that comes at once (a real one comes after the forward
has streamed a layer's weights through the caches). ``gpukv_streams`` is what the copy path
chooses for that call (:func:`gpukv.paged.copy_torch.nontemporal`). 1 torch thread, subjects in
turn within every repeat.
"""

from __future__ import annotations

import os

THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import MODELS, load_average, results_dir, thread_settings, time_interleaved, write_csv  # noqa: E402
from pools import Rotation, describe  # noqa: E402
from sweep_kernels import CHUNK, build  # noqa: E402

from gpukv.paged import copy_torch  # noqa: E402
from gpukv.paged.copy import pack, unpack  # noqa: E402
from gpukv.paged.native import native_copy  # noqa: E402

PRESETS = {"quick": dict(models=["llama3.1-8b", "deepseek-v3-mla"], repeats=9),
           "full": dict(models=["llama3.1-8b", "llama-70b-tp8", "deepseek-v3-mla", "deepseek-v3-fp8ds"],
                        repeats=15)}


def calls(num_layers: int) -> list[tuple[int, int]]:
    """(layers, chunks) per call, smallest first: a layer-wise unpack up to a whole retrieve."""
    return [(1, 1), (max(1, num_layers // 8), 1), (num_layers, 1), (num_layers, 4)]


def run_point(model: str, cache: tuple, num_layers: int, repeats: int) -> dict:
    """``cache``: :func:`sweep_kernels.build`'s DRAM-resident pages, slot sets and arena for every
    layer of the call's chunks; the call moves the first ``num_layers`` layers."""
    paged, slot_sets, arena, offsets, window = cache
    num_chunks = len(offsets[0])
    k, span = len(slot_sets), (0, num_layers)
    turn = Rotation(k)
    item = paged.block_size * paged.row_bytes
    call_bytes = window * num_layers // paged.num_layers
    real, chooses = copy_torch.STREAM_UNPACK_BYTES, copy_torch.nontemporal(False, call_bytes)

    def run(streaming: bool, read: bool) -> None:
        i = turn()
        copy_torch.STREAM_UNPACK_BYTES = 0 if streaming else 1 << 62  # stream always / never
        try:
            unpack(paged, slot_sets[i], arena, offsets[i], chunk_size=CHUNK, backend="torch", layers=span)
        finally:
            copy_torch.STREAM_UNPACK_BYTES = real
        if read:  # every page just written, read back into a window no recent call touched
            j = (i + k // 2) % k
            pack(paged, slot_sets[i], arena, offsets[j], chunk_size=CHUNK, backend="torch", layers=span)

    t = time_interleaved({"ordinary": lambda: run(False, False), "streaming": lambda: run(True, False),
                          "ordinary_read": lambda: run(False, True), "streaming_read": lambda: run(True, True)},
                         "cpu", repeats)

    def gain(a: str, b: str) -> tuple[float, float, float]:
        r = [x / y for x, y in zip(t[a], t[b])]
        return statistics.median(r), min(r), max(r)

    alone, with_read = gain("ordinary", "streaming"), gain("ordinary_read", "streaming_read")
    return dict(model=model, layers=num_layers, chunks=num_chunks, item_bytes=item,
                call_mbytes=round(call_bytes / 1e6, 1), gpukv_streams=chooses,
                ordinary_ms=round(statistics.median(t["ordinary"]) * 1e3, 2),
                streaming_ms=round(statistics.median(t["streaming"]) * 1e3, 2),
                ordinary_read_ms=round(statistics.median(t["ordinary_read"]) * 1e3, 2),
                streaming_read_ms=round(statistics.median(t["streaming_read"]) * 1e3, 2),
                streaming_gain=round(alone[0], 3), streaming_gain_span=f"{alone[1]:.2f}..{alone[2]:.2f}",
                streaming_gain_with_read=round(with_read[0], 3),
                streaming_gain_with_read_span=f"{with_read[1]:.2f}..{with_read[2]:.2f}",
                loadavg_1m=load_average()[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="quick")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    gather = native_copy()
    if gather is None or not gather.nontemporal:
        print("no compiled gather with streaming stores here (no C compiler or no AVX-512): nothing to measure")
        return 0
    print(f"# {thread_settings()}; load average {load_average()}")
    print(f"# {describe()}; streaming_gain = ordinary time / streaming time, same repeat, median (min..max)")
    print(f"{'model':18} {'layers':>6} {'chunks':>6} {'MB':>7} {'gpukv streams':>13} | {'alone':>17} | "
          f"{'with the read':>17} | {'ms ordinary / streaming (+read)':>32}")
    rows = []
    for model in preset["models"]:
        built = {}  # one cache per chunk count, shared by its calls
        for num_layers, num_chunks in calls(MODELS[model]["num_layers"]):
            if num_chunks not in built:
                built.clear()
                built[num_chunks] = build(model, "nhd", "blocks", num_chunks, "cpu", "dram")
            r = run_point(model, built[num_chunks], num_layers, preset["repeats"])
            rows.append(r)
            print(f"{model:18} {num_layers:6d} {num_chunks:6d} {r['call_mbytes']:7.1f} {str(r['gpukv_streams']):>13} | "
                  f"{r['streaming_gain']:5.2f} ({r['streaming_gain_span']:>9}) | "
                  f"{r['streaming_gain_with_read']:5.2f} ({r['streaming_gain_with_read_span']:>9}) | "
                  f"{r['ordinary_ms']:.1f} / {r['streaming_ms']:.1f} ({r['ordinary_read_ms']:.1f} / "
                  f"{r['streaming_read_ms']:.1f})", flush=True)
    path = write_csv(results_dir("cpu") / f"sweep_stream_readback_{args.preset}.csv", rows)
    print(f"load average after: {load_average()}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
