"""Benchmark suites: a suite is a list of (label, model config name, config overrides).

Other layers add their suites here (e.g. `ablations`); the harness runs any of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    label: str  # row name in the results table and run sub-folder
    model: str  # configs/models/<model>.yaml
    overrides: tuple[str, ...] = field(default_factory=tuple)  # --set KEY=VALUE items


SUITES: dict[str, list[Entry]] = {
    # the paper's classical sequential baselines, each with its default config
    "classic": [
        Entry("SASRec", "sasrec"),
        Entry("SASRec-BCE", "sasrec_bce"),
        Entry("GRU4Rec", "gru4rec"),
        Entry("BERT4Rec", "bert4rec"),
        Entry("Caser", "caser"),
        Entry("HGN", "hgn"),
        Entry("FMLP-Rec", "fmlp"),
    ],
}
