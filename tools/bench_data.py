"""Data-pipeline throughput per core: ingest (images/s), tokenizer (tokens/s), and the loader
(tokens/s) on both paths: online packing, and rows packed offline by tools/pack_shards.py.

    taskset -c 0 python tools/bench_data.py [--work /tmp/bench_data] [--seconds 20] [--json]
    python tools/bench_data.py --only loader --workers 0 1 2      # the worker-process curve

Builds what it measures under --work (kept between runs): caption tars in img2dataset's layout
for the ingest: real-img2dataset-like images (512 px on the short side, quality 95, ~0.35 MP and
~122 KiB each, what img2dataset writes for real web photos) and a lighter set (512 px on the
long side); and a synthetic corpus of ingested-size shards (256-px JPEGs, web-like lengths;
pretrain/data/corpora/synthetic.py) for the loader at the paper's setting: 224-px images, 14-px
patches (256 per image), seq_len 1024, mixture 45/45/10 with caption rows tail-filled with text,
augmentation on.

Every rate is given twice: per CPU-second of this process (`cpu`, what "per core" means; robust
to other jobs sharing the machine) and per wall-clock second (`wall`, honest only on an idle
core). Run it pinned to one core (taskset -c 0) so that neither number borrows a second core.
Targets: loader >= 150k tokens/s/core (issue 6), ingest >= 300 images/s/core on the
img2dataset-like shards (issue 16). `--only ingest --profile` prints where the ingest time goes.

`--workers 0 1 2 ...` runs the loader once per worker-process count (data.num_workers) and adds,
per count, the CPU time of the worker processes to the per-CPU-second rate and the training
thread's own CPU time per batch (`main ms/batch`). Do not pin that run to one core.
"""
import argparse
import io
import json
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def img2dataset_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 95,
                          sigma: float = 4.0) -> bytes:
    """A photo-like JPEG as img2dataset stores real web images (512 px on the short side, quality
    95): detail at three scales plus sensor-like noise; sigma 4 gives about 122 KiB at 683x512,
    what real img2dataset shards hold per image."""
    from PIL import Image
    acc = np.zeros((height, width, 3), np.float32)
    for cells, amp in [(8, 1.0), (40, 0.45), (160, 0.25)]:
        small = rng.normal(0, 1, (cells, max(2, cells * width // height), 3))
        small = ((small - small.min()) / np.ptp(small) * 255).astype(np.uint8)
        acc += amp * np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    acc = acc / 1.7 + rng.normal(0, sigma, acc.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# Ingest inputs: name -> (description, pool of (width, height), image generator).
INGEST_SETS = {
    "512long": ("512-px (long side) JPEG q90, ~0.2 MP", [(512, 512), (512, 384)], "photo_like"),
    # Real img2dataset output at --image_size 512 --resize_mode keep_ratio: the SHORT side is 512.
    "img2dataset": ("img2dataset-like: 512-px short side, q95, ~0.35 MP, ~122 KiB",
                    [(683, 512), (512, 683), (512, 512), (768, 512)], "img2dataset_like"),
}


def _ingest_tar(work: str, which: str, n_images: int) -> tuple[str, dict]:
    """The caption tar of one INGEST_SETS entry (img2dataset layout), built once; its statistics."""
    from pretrain.data.corpora.synthetic import photo_like_jpeg
    src = os.path.join(work, "ingest_src")
    os.makedirs(src, exist_ok=True)
    tar_path = os.path.join(src, f"{which}-{n_images}.tar")
    g = np.random.default_rng(0)
    _, sizes, gen = INGEST_SETS[which]
    make = photo_like_jpeg if gen == "photo_like" else img2dataset_like_jpeg
    pool = [make(g, *sizes[i % len(sizes)]) for i in range(32)]  # built each run: sizes are reported
    px = [sizes[i % len(sizes)][0] * sizes[i % len(sizes)][1] for i in range(32)]
    info = {"kib_per_image": sum(map(len, pool)) / len(pool) / 1024, "mp_per_image": sum(px) / len(px) / 1e6}
    if not os.path.isfile(tar_path):
        with tarfile.open(tar_path + ".tmp", "w") as t:
            for i in range(n_images):
                for name, data in [(f"{i:09d}.jpg", pool[i % len(pool)]),
                                   (f"{i:09d}.txt", f"a photo of thing number {i} on a table".encode())]:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    t.addfile(ti, io.BytesIO(data))
        os.replace(tar_path + ".tmp", tar_path)
    return tar_path, info


def bench_ingest(work: str, n_images: int, which: str = "img2dataset", profile: bool = False) -> dict:
    from pretrain.data.corpora.synthetic import synthetic_tokenizer
    from pretrain.data.ingest.captions import read_captions
    from pretrain.data.ingest.driver import IngestConfig, run_ingest
    tar_path, info = _ingest_tar(work, which, n_images)
    out = os.path.join(work, "ingest_out")
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    # val_min_docs=0: no held-out count pass (a large source skips it too; heldout.py).
    cfg = IngestConfig(output=out, tokenizer=synthetic_tokenizer(work), source="caption", progress=False,
                       image_size=256, shard_samples=1000, val_min_docs=0)
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        stats, wall, cpu = _timed(lambda: prof.runcall(run_ingest, [tar_path], cfg, read_captions))
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    else:
        stats, wall, cpu = _timed(lambda: run_ingest([tar_path], cfg, read_captions))
    assert stats.images == n_images, stats
    return {"what": f"ingest {INGEST_SETS[which][0]} -> 256 px ({info['kib_per_image']:.0f} KiB, "
                    f"{info['mp_per_image']:.2f} MP measured)",
            "unit": "images/s", "n": n_images, "cpu": n_images / cpu, "wall": n_images / wall}


def bench_tokenizer(work: str, seconds: float) -> dict:
    import random

    from pretrain.data.corpora.demo import text_document
    from pretrain.data.tokenizer import Tokenizer, train_tokenizer
    path = os.path.join(work, "tok_bench.model")
    rng = random.Random(0)
    docs = [text_document(rng) for _ in range(2000)]
    if not os.path.isfile(path):
        train_tokenizer(iter(docs), os.path.join(work, "tok_bench"), vocab_size=2000)
    tok = Tokenizer(path)
    n_tok = 0
    w, c = time.perf_counter(), time.process_time()
    while time.perf_counter() - w < seconds:
        for d in docs:
            n_tok += len(tok.encode(d))
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"what": "sentencepiece encode (BPE, 2k vocab, English prose)", "unit": "tokens/s",
            "n": n_tok, "cpu": n_tok / cpu, "wall": n_tok / wall}


def _children_cpu(ld) -> float:
    """CPU seconds (user + system) used so far by the loader's worker processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in getattr(getattr(ld, "_dl_iter", None), "_workers", []):
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            pass
    return total


def bench_loader(work: str, seconds: float, workers: int = 0, decode_threads: int = 0) -> dict:
    """The online loader with `workers` worker processes (data.num_workers). CPU time counts
    this process and its workers; `main_ms` is this thread's CPU time per batch, what the
    training loop pays to receive one."""
    from pretrain.data import DataConfig, build_train_loader
    from pretrain.data.stats import StatsAccumulator
    from pretrain.data.corpora.synthetic import make_synthetic_corpus
    root = os.path.join(work, "synthetic224")
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        make_synthetic_corpus(root, n_caption=3000, n_interleaved=1000, n_text=600)
    cfg = DataConfig(root=root, seq_len=1024, image_size=224, patch_size=14, pack_buffer=64,
                     fill_rows_of=["caption"], num_workers=workers, decode_threads=decode_threads)
    mbs = 8
    ld = build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=mbs)
    for _ in range(4 + 2 * workers):  # warm-up: start workers, fill the packing buffers
        next(ld)
    acc = StatsAccumulator(cfg.sources)
    n, main_cpu = 0, 0.0
    w, c, cc = time.perf_counter(), time.process_time(), _children_cpu(ld)
    while time.perf_counter() - w < seconds:
        t = time.thread_time()
        next(ld)
        main_cpu += time.thread_time() - t
        acc.add(ld.last_stats)
        n += 1
    wall = time.perf_counter() - w
    cpu = time.process_time() - c + _children_cpu(ld) - cc
    ld.close()
    n_tok = n * mbs * cfg.seq_len
    s = acc.summary()
    what = "loader: read, decode, crop+flip 224, patchify, best-fit pack, PackedBatch (T=1024)"
    return {"what": what if not workers else f"{what}, {workers} worker process(es)",
            "unit": "tokens/s", "n": n_tok, "cpu": n_tok / cpu, "wall": n_tok / wall, "workers": workers,
            "main_ms": 1000 * main_cpu / max(n, 1), "batches": n,
            "images_per_s_cpu": sum(v["images_per_row"] * v["rows"] for v in s["per_source"].values()) / cpu,
            "padding_frac": s["padding_frac"]}


def bench_packed_rows(work: str, seconds: float) -> dict:
    """The offline path (issue 8): the same corpus packed once by tools/pack_shards.py's library,
    then read by the packed-row loader (decode, crop+flip, patchify, layout; no packing)."""
    from dataclasses import replace

    from pretrain.data import DataConfig
    from pretrain.data.offline.pack import pack_shards
    from pretrain.data.offline.row_loader import bench_row_loader
    from pretrain.data.corpora.synthetic import make_synthetic_corpus
    root = os.path.join(work, "synthetic224")
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        make_synthetic_corpus(root, n_caption=3000, n_interleaved=1000, n_text=600)
    cfg = DataConfig(root=root, seq_len=1024, image_size=224, patch_size=14, pack_buffer=64,
                     fill_rows_of=["caption"])
    rows_root = os.path.join(work, "rows224")
    if not os.path.isfile(os.path.join(rows_root, "manifest.json")):
        pack_shards([root], rows_root, cfg, progress=False)
    rcfg = replace(cfg, format="packed_rows", rows_root=rows_root)
    w, c = time.perf_counter(), time.process_time()
    per_cpu = bench_row_loader(rcfg, micro_batch_size=8, seconds=seconds)
    return {"what": "loader over packed rows (tools/pack_shards.py): read, decode, crop+flip, patchify",
            "unit": "tokens/s", "cpu": per_cpu,
            "wall": per_cpu * (time.process_time() - c) / max(time.perf_counter() - w, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench_data")
    ap.add_argument("--seconds", type=float, default=20.0, help="measuring time for tokenizer and loader")
    ap.add_argument("--ingest-images", type=int, default=3000)
    ap.add_argument("--ingest-sets", nargs="+", choices=sorted(INGEST_SETS), default=["img2dataset", "512long"])
    ap.add_argument("--profile", action="store_true", help="cProfile the ingest (top functions by own time)")
    ap.add_argument("--only", choices=["ingest", "tokenizer", "loader", "rows"], nargs="*")
    ap.add_argument("--workers", type=int, nargs="+", default=[0],
                    help="loader worker-process counts to measure (data.num_workers)")
    ap.add_argument("--decode-threads", type=int, default=0, help="data.decode_threads for the loader")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    only = set(a.only or ["ingest", "tokenizer", "loader", "rows"])
    rows = []
    if "ingest" in only:
        for which in a.ingest_sets:
            rows.append(bench_ingest(a.work, a.ingest_images, which, a.profile))
    if "tokenizer" in only:
        rows.append(bench_tokenizer(a.work, a.seconds))
    if "loader" in only:
        rows.extend(bench_loader(a.work, a.seconds, n, a.decode_threads) for n in a.workers)
    if "rows" in only:
        rows.append(bench_packed_rows(a.work, a.seconds))
    env = {"cpu_affinity": sorted(os.sched_getaffinity(0)), "loadavg_1m": os.getloadavg()[0],
           "cpus": os.cpu_count()}
    if a.json:
        print(json.dumps({"env": env, "results": rows}, indent=1))
        return
    print(f"cores allowed: {env['cpu_affinity']}  load average (1 min): {env['loadavg_1m']:.1f} "
          f"on {env['cpus']} CPUs")
    print(f"{'benchmark':<86} {'per CPU-s':>12} {'per wall-s':>12}  unit")
    for r in rows:
        print(f"{r['what']:<86} {r['cpu']:>12,.0f} {r['wall']:>12,.0f}  {r['unit']}")
        if "main_ms" in r:
            print(f"{'  (main thread: CPU ms per batch of 8 x 1024, batches measured)':<86} "
                  f"{r['main_ms']:>12.2f} {r['batches']:>12d}")
        if "padding_frac" in r:
            print(f"{'  (loader: images/s per CPU-s, padding fraction)':<86} {r['images_per_s_cpu']:>12,.0f} "
                  f"{r['padding_frac']:>12.4f}")


if __name__ == "__main__":
    main()
