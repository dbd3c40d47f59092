"""The paper's model presets (Table 6), as numbers this package can use without the model code.

Transcribed from the paper's Table 6. Preset names match the
YAML files `pretrain/configs/paper/{early,moe}_{275m,...,3.35b}.yaml` and
`late_{289m,...,3.7b}.yaml`. `params` is the paper's count (active parameters for the MoE; for
late fusion the paper's total, of which `vision_params` is a nominal 12 * depth * width^2
estimate of the ViT encoder and `params - vision_params` the decoder, the N of
`C = 6 (N D + N_v D_v)`). The run's own `summary.json` carries the trainer's exact counts, and
`collect_runs` uses those; these numbers only size sweeps. The model-accounting code may replace
this table later.

    from pretrain.scaling.presets import get_preset
    get_preset("early", "932m").lr
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER_BATCH_SIZE = 2048      # sequences per step (about 2M tokens at 1024)
PAPER_SEQ_LEN = 1024
PAPER_COOLDOWN_FRACTION = 0.2
LATE_FUSION_DV_RATIO = 0.544   # D_v / D for the 45-45-10 mixture (appendix C.2)


@dataclass(frozen=True)
class Preset:
    kind: str                 # early | late | moe
    name: str                 # e.g. "275m", the suffix of the preset YAML
    params: float             # N as in Table 6 (active for MoE; total for late fusion)
    width: int
    depth: int
    lr: float
    vision_width: int = 0     # late fusion only
    vision_depth: int = 0

    @property
    def vision_params(self) -> float:
        """Nominal ViT parameter count, 12 L w^2 (0 unless late fusion)."""
        return 12.0 * self.vision_depth * self.vision_width ** 2

    @property
    def decoder_params(self) -> float:
        """The N of the FLOP count: all parameters but the vision encoder's."""
        return self.params - self.vision_params

    def config_path(self, config_dir: str = "pretrain/configs/paper") -> str:
        return f"{config_dir}/{self.kind}_{self.name}.yaml"


_EARLY = dict(names=("275m", "468m", "932m", "1.63b", "2.28b", "3.35b"),
              params=(275e6, 468e6, 932e6, 1.63e9, 2.28e9, 3.35e9),
              width=(800, 1088, 1632, 2208, 2624, 3232),
              lr=(1.5e-3, 1.5e-3, 5e-4, 4.2e-4, 4e-4, 3.5e-4))
_LATE = dict(names=("289m", "494m", "1b", "1.75b", "2.43b", "3.7b"),
             params=(289e6, 494e6, 1.0e9, 1.75e9, 2.43e9, 3.7e9),
             width=(768, 1024, 1536, 2048, 2464, 3072),
             vision_width=(384, 512, 768, 1024, 1184, 1536),
             lr=(1.5e-3, 1.5e-3, 5e-4, 4.2e-4, 3.8e-4, 3.3e-4))


def _build() -> dict:
    table = {}
    for kind in ("early", "moe"):
        for i, name in enumerate(_EARLY["names"]):
            table[(kind, name)] = Preset(kind, name, _EARLY["params"][i], _EARLY["width"][i], 24, _EARLY["lr"][i])
    for i, name in enumerate(_LATE["names"]):
        table[("late", name)] = Preset("late", name, _LATE["params"][i], _LATE["width"][i], 24, _LATE["lr"][i],
                                       vision_width=_LATE["vision_width"][i], vision_depth=24)
    return table


PRESETS: dict = _build()


def preset_names(kind: str) -> list[str]:
    return [name for (k, name) in PRESETS if k == kind]


def get_preset(kind: str, name: str) -> Preset:
    try:
        return PRESETS[(kind, name.lower())]
    except KeyError:
        raise KeyError(f"no preset {kind}_{name}; known for {kind}: {', '.join(preset_names(kind))}") from None
