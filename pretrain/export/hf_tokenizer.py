"""Our sentencepiece tokenizer as a Hugging Face tokenizer (`AutoTokenizer.from_pretrained(DIR)`).

Written files: `tokenizer.model` (the sentencepiece model itself), `tokenizer.json` (a `tokenizers`
BPE with byte fallback, built by transformers' own sentencepiece converter) and
`tokenizer_config.json`. Two settings make it give sentencepiece's ids exactly:
- the normaliser prepends "▁" and maps every space to "▁", with no pre-tokenizer: sentencepiece
  (add_dummy_prefix, no whitespace normalisation) does exactly this, whereas the Metaspace
  pre-tokenizer transformers picks by default skips the prefix before a leading space;
- `split_special_tokens: true`: `<s> </s> <pad> <boi> <eoi>` are control symbols, so raw text that
  spells "<boi>" is ordinary characters, as in training (the ids stay reachable through
  `bos_token_id`, `convert_tokens_to_ids("<boi>")`, ...).
`tokenizer("text")` adds BOS like our documents (which start with `<s>`);
`add_special_tokens=False` gives exactly `Tokenizer.encode(text)`.
`write_hf_tokenizer` checks the result against sentencepiece on probe strings and refuses to
leave a tokenizer that disagrees.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

PROBES = ["a red circle at the top left.", "  two  spaces\tand a tab\n\nnewlines ", " leading space",
          "héllo wörld 12345 ∑ 日本語 🙂", "<boi> text that spells <eoi> </s> <s> <pad> <unk>", "",
          "▁ marker ▁▁", "x" * 40, "The quick brown fox jumps over the lazy dog. 3.14159!?"]


def _build_tokenizer_json(sp_model: str, out: Path) -> None:
    from tokenizers import decoders, normalizers
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(sp_model, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
             "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False}))
        converted = AutoTokenizer.from_pretrained(tmp)  # transformers' sentencepiece -> BPE converter
    backend = converted._tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.save(str(out / "tokenizer.json"))


def write_hf_tokenizer(sp_model: str, out: str | Path, model_max_length: int) -> dict:
    """Write the tokenizer files into `out`; returns the special ids (for config.json)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    out = Path(out)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    shutil.copyfile(sp_model, out / "tokenizer.model")
    _build_tokenizer_json(sp_model, out)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_special_tokens": ["<boi>", "<eoi>"], "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
        "padding_side": "left"}, indent=2) + "\n")
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in PROBES:
        ours, theirs = sp.encode(text), hf(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise RuntimeError(f"Hugging Face tokenizer in {out} disagrees with {sp_model} on {text!r}: "
                               f"{theirs} != {ours}")
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id(),
           "boi_token_id": sp.piece_to_id("<boi>"), "eoi_token_id": sp.piece_to_id("<eoi>")}
    got = {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id,
           "boi_token_id": hf.convert_tokens_to_ids("<boi>"), "eoi_token_id": hf.convert_tokens_to_ids("<eoi>")}
    if got != ids:
        raise RuntimeError(f"Hugging Face tokenizer in {out}: special ids {got} differ from sentencepiece's {ids}")
    return ids
