"""Stage 1 of the data pipeline: raw web data -> training shards + manifest (tools/prepare_data.py).

  io.py           container readers (JSONL plain/.gz/.zst, parquet, webdataset tars) and `Skip`
  captions.py     image-caption pairs (img2dataset tars, parquet, JSONL) -> RawDoc
  interleaved.py  OBELICS-style interleaved documents -> RawDoc
  text.py         text documents (DCLM-style JSONL) -> RawDoc
  driver.py       the driver shared by the formats: images at ingest, skip accounting, resumable
                  per-file tasks, shards and manifest (written through data/shards.py)
"""
