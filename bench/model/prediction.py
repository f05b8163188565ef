"""What the model predicts: the shape it predicts at (`Shape`), a path's kernels grouped into phases (`Phase`)
and the whole prediction (`Prediction`), with the `predicted_*` fields the bench stores beside a measurement."""

from __future__ import annotations

from dataclasses import dataclass

from .paths import HEADLINE


@dataclass(frozen=True)
class Shape:
    """N tokens, student / teacher hidden widths, vocabulary (`parse("8192x4096x4096x128256")`)."""

    tokens: int
    hidden_student: int
    hidden_teacher: int
    vocab: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        parts = text.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 1:
            raise ValueError(f"shape: expected TOKENSxHSxHTxVOCAB such as {HEADLINE}, got {text!r}")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.tokens}x{self.hidden_student}x{self.hidden_teacher}x{self.vocab}"


@dataclass(frozen=True)
class Phase:
    """One kernel (or a group of identical launches) of a path: matmul flops, HBM bytes, predicted seconds.
    `items` names the bytes; `*_l2` are the L2-reuse variant (equal to the others outside the fused kernels)."""

    name: str  # "fwd: ..." or "bwd: ..." (`forward`)
    flops: float  # matmul flops, over every launch
    bytes: float  # HBM bytes, over every launch
    seconds: float
    detail: str = ""  # the named bytes in words, programs per launch, launches
    elementwise_flops: float = 0.0
    launches: float = 0.0
    bytes_l2: float = 0.0
    seconds_l2: float = 0.0
    items: tuple = ()  # (name, bytes) of the traffic

    @property
    def forward(self) -> bool:
        return self.name.startswith("fwd")


@dataclass(frozen=True)
class Prediction:
    path: str
    shape: Shape
    gpu: str
    divergence: str
    dtype: str
    tf32: bool
    phases: tuple
    floor_s: float
    extra_bytes: float
    extra_detail: str = ""
    notes: tuple = ()

    @property
    def forward_s(self) -> float:
        return sum(p.seconds for p in self.phases if p.forward)

    @property
    def backward_s(self) -> float:
        return sum(p.seconds for p in self.phases if not p.forward)

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def total_l2_s(self) -> float:
        return sum(p.seconds_l2 for p in self.phases)

    @property
    def ratio_to_floor(self) -> float:
        return self.total_s / self.floor_s

    @property
    def hbm_bytes(self) -> float:
        return sum(p.bytes for p in self.phases)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    def as_record(self) -> dict:
        """The flat `predicted_*` fields stored beside a measurement."""
        return {"predicted_path": self.path, "predicted_forward_ms": self.forward_s * 1e3,
                "predicted_backward_ms": self.backward_s * 1e3, "predicted_total_ms": self.total_s * 1e3,
                "predicted_total_l2_ms": self.total_l2_s * 1e3, "predicted_ratio_floor": self.ratio_to_floor,
                "predicted_extra_bytes": int(self.extra_bytes)}

    def as_json(self) -> dict:
        return {"path": self.path, "shape": str(self.shape), "gpu": self.gpu, "divergence": self.divergence,
                "dtype": self.dtype, "tf32": self.tf32, **self.as_record(),
                "floor_ms": self.floor_s * 1e3,
                "hbm_bytes": self.hbm_bytes, "matmul_flops": self.flops, "extra_detail": self.extra_detail,
                "notes": list(self.notes),
                "phases": [{"name": p.name, "flops": p.flops, "elementwise_flops": p.elementwise_flops,
                            "bytes": p.bytes, "seconds": p.seconds, "bytes_l2": p.bytes_l2,
                            "seconds_l2": p.seconds_l2, "launches": p.launches, "detail": p.detail}
                           for p in self.phases]}


#: The fields of `Prediction.as_record`, as bench records store them (bench/report.py: PREDICTED_FIELDS).
RECORD_FIELDS = ("predicted_path", "predicted_forward_ms", "predicted_backward_ms", "predicted_total_ms",
                 "predicted_total_l2_ms", "predicted_ratio_floor", "predicted_extra_bytes")
