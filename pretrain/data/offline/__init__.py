"""Optional stage between shards and training: rows packed once, ahead of time, and rebalancing.

  rows.py        packed-row shards: tokens, layout and the images still as JPEG, + manifest
  pack.py        offline packing (tools/pack_shards.py): the online packer's own rows, fixed once
  row_loader.py  the loader over packed rows (data.format=packed_rows), same interface as TrainLoader
  reshard.py     rewrite any shard set into N shards balanced by tokens (tools/reshard.py)
"""
