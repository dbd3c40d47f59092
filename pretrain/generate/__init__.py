"""Generation from a trained model: text+image prompts in, text out, with a KV cache.

    from pretrain.generate import GenerationConfig, generate, load_for_generation
    lm = load_for_generation("runs/demo")            # a run dir, a checkpoint step dir or an export
    out = generate(lm, [[image], [image, "Question: what colour is it? Answer:"]],
                   GenerationConfig(max_new_tokens=16, stop=["."]))

Modules: prompts.py (prompt layout), cache.py (KV cache and its mask), sampling.py (greedy,
temperature, top-k/top-p, stop strings), loop.py (the decoding loop), loading.py (checkpoints and
exports). Command line: tools/generate.py. Tests: tests/test_generate.py.
"""
from pretrain.generate.loading import InferenceModel, load_for_generation
from pretrain.generate.loop import Generation, generate
from pretrain.generate.sampling import GenerationConfig

__all__ = ["Generation", "GenerationConfig", "InferenceModel", "generate", "load_for_generation"]
