"""Corpora generated from nothing (no download), written as ordinary shards + manifest.

  demo.py       the coloured-shapes demo corpus the demo run learns from (tools/make_demo_data.py)
  synthetic.py  web-like synthetic corpora for benchmarks and packing statistics (tools/bench_data.py,
                tools/pack_stats.py); their lengths follow the paper's sources, they are not for learning
"""
