"""The model config: width, heads, and a list of layers, one name (or one dict) per layer."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields

from linattn.layers import LAYERS

# Arguments the model sets itself; a per-layer dict may not override them.
_SET_BY_MODEL = ("d_model", "causal")
# Arguments the model passes to every layer (a per-layer dict may override n_heads and impl).
_MODEL_ARGS = ("d_model", "n_heads", "causal", "impl")


def _default_layers() -> list[str | dict]:
    return ["gated_deltanet", "gated_deltanet", "gated_deltanet", "softmax"]


@dataclass
class LMConfig:
    """A stack of pre-norm blocks (mixer, then SwiGLU MLP), each mixer picked by name.

    Args:
        vocab_size: number of token ids (256 for bytes).
        d_model: width of the residual stream.
        n_heads: heads of every mixer (a per-layer dict may set its own).
        layers: one entry per block: a name from linattn.layers.LAYERS ("linear_attn", "retnet", "gla",
            "deltanet", "gated_deltanet", "mamba2", "softmax"), or a dict {"type": name, **layer arguments},
            e.g. {"type": "softmax", "window": 256, "n_kv_heads": 1}.
        mlp_hidden: SwiGLU width; None gives 8/3 d_model rounded up to a multiple of 64.
        norm_eps: epsilon of every RMSNorm.
        tie_embeddings: the output head shares the input embedding's weights.
        impl: the ops' impl ("auto": recurrence when decoding, chunked otherwise, Triton on CUDA when present).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    layers: list[str | dict] = field(default_factory=_default_layers)
    mlp_hidden: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    impl: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig: {name} must be a positive int, got {value!r}")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
            raise ValueError(f"LMConfig: mlp_hidden must be a positive int or None, got {self.mlp_hidden!r}")
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError(f"LMConfig: layers must be a non-empty list of layer names or dicts, got {self.layers!r}")
        self.layers = list(self.layers)
        for i in range(len(self.layers)):
            self.layer_spec(i)  # validates

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or -(-(8 * self.d_model) // (3 * 64)) * 64

    def layer_spec(self, i: int) -> tuple[str, dict]:
        """(layer name, its arguments beyond the model's own) for layer i; raises ValueError if malformed."""
        entry = self.layers[i]
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict):
            options = dict(entry)
            name = options.pop("type", None)
        else:
            raise ValueError(f"LMConfig: layers[{i}] must be a layer name or a dict, got {type(entry).__name__}")
        if name not in LAYERS:
            raise ValueError(f"LMConfig: layers[{i}] names {name!r}; the layer names are {sorted(LAYERS)}")
        params = inspect.signature(LAYERS[name]).parameters
        accepted = set(params) - set(_SET_BY_MODEL)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(
                f"LMConfig: layers[{i}] ({name}) has unknown options {unknown}; it accepts {sorted(accepted)}"
            )
        required = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in _MODEL_ARGS]
        missing = [p for p in required if p not in options]
        if missing:
            raise ValueError(
                f"LMConfig: layers[{i}] ({name}) needs the options {missing}, as in "
                f"{{'type': {name!r}, {', '.join(repr(p) + ': ...' for p in missing)}}}"
            )
        return name, options

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LMConfig: unknown fields {unknown}; the fields are {sorted(known)}")
        return cls(**d)
