"""Stage 1 of the data pipeline: raw web data -> training shards + manifest (tools/prepare_data.py).

  download.py     image URLs (OBELICS as released) fetched with img2dataset, cached by URL
  io.py           container readers (JSONL plain/.gz/.zst, parquet, webdataset tars) and `Skip`
  image_refs.py   an image field (bytes, confined local path, URL via the cache) -> bytes
  captions.py     image-caption pairs (img2dataset tars, parquet, JSONL) -> RawDoc
  interleaved.py  OBELICS-style interleaved documents -> RawDoc
  text.py         text documents (DCLM-style JSONL) -> RawDoc
  image_prep.py   one image -> the stored JPEG (checks, EXIF, draft decode, resize, colour modes)
  lengths.py      long documents split at paragraph boundaries
  heldout.py      the val split of a source: a fraction, and at least a minimum
  accounting.py   counts by reason that add up; the checks that make a bad run exit non-zero
  driver.py       the driver shared by the formats: keys, images, tokens, resumable per-file
                  tasks, shards and manifest (written through data/shards.py)
"""
