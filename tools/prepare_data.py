"""Turn raw web data into training shards + manifest (logic in pretrain/data/ingest/).

    python tools/prepare_data.py captions    --input laion/{00000..00099}.tar --output data/web --tokenizer tok.model
    python tools/prepare_data.py interleaved --input obelics/*.parquet --download --output data/web --tokenizer tok.model
    python tools/prepare_data.py text        --input dclm/*.jsonl.zst        --output data/web --tokenizer tok.model

Each input file is one task (use --workers N to run N at once); an interrupted run restarts where
it stopped (inputs already done are not redone). Bad samples are counted by reason and skipped;
the summary is printed as JSON at the end (and written to OUTPUT/.ingest/{source}/summary.json).
Several sources go into one OUTPUT: each run merges its source into OUTPUT/manifest.json.

--download (captions, interleaved): image fields holding http(s) URLs (OBELICS as released) are
fetched first with img2dataset into --download-cache (one file per URL, so a rerun fetches
nothing twice), then ingested as local images; a failed download removes that image slot and
is counted by reason (pretrain/data/ingest/download.py).

The exit status is non-zero, with the most frequent reasons printed, when an input failed, when
nothing was written, when an image source ends with no image, or when more than
--max-skip-fraction of the samples were skipped.
"""
import argparse
import glob
import json
import logging
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.ingest.accounting import problems, top_reasons  # noqa: E402
from pretrain.data.ingest.download import DEFAULT_DISALLOWED, DownloadConfig  # noqa: E402
from pretrain.data.ingest.driver import IngestConfig, run_ingest  # noqa: E402

DEFAULT_SOURCE = {"captions": "caption", "interleaved": "interleaved", "text": "text", "llava": "sft"}


def reader_for(kind: str):
    if kind == "llava":
        from pretrain.data.ingest.llava import read_llava
        return read_llava
    if kind == "captions":
        from pretrain.data.ingest.captions import read_captions
        return read_captions
    if kind == "interleaved":
        from pretrain.data.ingest.interleaved import read_interleaved
        return read_interleaved
    from pretrain.data.ingest.text import read_text
    return read_text


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    D = IngestConfig
    ap.add_argument("kind", choices=sorted(DEFAULT_SOURCE))
    ap.add_argument("--input", nargs="+", required=True, help="files or glob patterns (** for any depth)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model (tools/train_tokenizer.py)")
    ap.add_argument("--source", default=None, help="source name (default: caption / interleaved / text)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--val-fraction", type=float, default=D.val_fraction)
    ap.add_argument("--val-min-docs", type=int, default=D.val_min_docs,
                    help="held-out documents at least (at most half the source)")
    ap.add_argument("--shard-samples", type=int, default=D.shard_samples)
    ap.add_argument("--image-size", type=int, default=D.image_size,
                    help="stored shorter side in pixels (never upscaled)")
    ap.add_argument("--max-pixels", type=int, default=D.max_pixels)
    ap.add_argument("--min-image-size", type=int, default=D.min_image_size)
    ap.add_argument("--jpeg-quality", type=int, default=D.jpeg_quality)
    ap.add_argument("--max-caption-tokens", type=int, default=D.max_caption_tokens)
    ap.add_argument("--max-doc-tokens", type=int, default=D.max_doc_tokens,
                    help="longer text/interleaved documents are split at paragraph boundaries; "
                         "longer llava conversations are skipped (too_long)")
    ap.add_argument("--image-tokens", type=int, default=D.image_tokens,
                    help="tokens an image counts for in those lengths (patches + <boi>/<eoi> for llava)")
    ap.add_argument("--image-column", default=D.image_column)
    ap.add_argument("--caption-column", default=D.caption_column)
    ap.add_argument("--text-field", default=D.text_field)
    ap.add_argument("--image-root", default="", help="folder that local image paths in records resolve "
                    "under (default: each input's own folder); paths leaving it are refused")
    ap.add_argument("--max-skip-fraction", type=float, default=0.5,
                    help="exit non-zero when more than this fraction of the samples were skipped")
    dl = ap.add_argument_group("downloading image URLs (img2dataset)")
    dl.add_argument("--download", action="store_true", help="fetch http(s) image references first")
    dl.add_argument("--download-cache", default=None, help="default: OUTPUT/.download_cache")
    dl.add_argument("--download-processes", type=int, default=DownloadConfig.processes)
    dl.add_argument("--download-threads", type=int, default=DownloadConfig.threads)
    dl.add_argument("--download-timeout", type=float, default=DownloadConfig.timeout, help="seconds per request")
    dl.add_argument("--download-retries", type=int, default=DownloadConfig.retries)
    dl.add_argument("--user-agent-token", default="", help="sent in the User-Agent; X-Robots-Tag "
                    "directives addressed to it are honoured")
    dl.add_argument("--disallowed-header-directives", nargs="*", default=list(DEFAULT_DISALLOWED),
                    help="X-Robots-Tag directives that forbid using an image (none: honour nothing)")
    dl.add_argument("--retry-failed", action="store_true", help="fetch again the URLs that failed before")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args()


def _inputs(patterns: list[str]) -> list[str]:
    inputs = []
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise SystemExit(f"prepare_data: --input {pat!r} matches no file")
        inputs.extend(hits)
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"prepare_data: input file(s) not found: {missing[:5]}")
    return sorted(set(inputs))


def _download(a, inputs: list[str], cfg: IngestConfig) -> dict:
    from pretrain.data.ingest.download import collect_urls, download_missing
    if a.kind == "text":
        raise SystemExit("prepare_data: --download is for captions and interleaved inputs")
    dcfg = DownloadConfig(cache=cfg.download_cache, processes=a.download_processes, threads=a.download_threads,
                          timeout=a.download_timeout, retries=a.download_retries,
                          user_agent_token=a.user_agent_token,
                          disallowed_header_directives=tuple(a.disallowed_header_directives),
                          retry_failed=a.retry_failed, progress=cfg.progress)
    column = "images" if a.kind == "interleaved" else cfg.image_column
    try:
        stats = download_missing(collect_urls(inputs, column), dcfg)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"prepare_data: {e}")
    return asdict(stats)


def main() -> None:
    a = _args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = _inputs(a.input)
    cache = ""
    if a.download:
        cache = os.path.abspath(a.download_cache or os.path.join(a.output, ".download_cache"))
    cfg = IngestConfig(output=a.output, tokenizer=a.tokenizer, source=a.source or DEFAULT_SOURCE[a.kind],
                       val_fraction=a.val_fraction, val_min_docs=a.val_min_docs, shard_samples=a.shard_samples,
                       image_size=a.image_size, max_pixels=a.max_pixels, min_image_size=a.min_image_size,
                       jpeg_quality=a.jpeg_quality, max_caption_tokens=a.max_caption_tokens,
                       max_doc_tokens=a.max_doc_tokens, image_tokens=a.image_tokens, workers=a.workers, image_column=a.image_column,
                       caption_column=a.caption_column, text_field=a.text_field, image_root=a.image_root,
                       download_cache=cache, progress=not a.no_progress)
    download = _download(a, inputs, cfg) if a.download else None
    try:
        stats = run_ingest(inputs, cfg, reader_for(a.kind))
    except ValueError as e:
        raise SystemExit(f"prepare_data: {e}")
    summary = {"source": cfg.source, "output": os.path.abspath(a.output), **asdict(stats)}
    if download is not None:
        summary["download"] = download
    os.makedirs(os.path.join(a.output, ".ingest", cfg.source), exist_ok=True)
    with open(os.path.join(a.output, ".ingest", cfg.source, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    bad = problems(stats, needs_images=a.kind != "text", max_skip_fraction=a.max_skip_fraction)
    if bad:
        print(f"prepare_data: FAILED for source {cfg.source!r}:", *(f"  {p}" for p in bad),
              "most frequent reasons:", *(f"  {r}" for r in top_reasons(stats)), sep="\n", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
