"""Analytic FLOP counts of every matcher in the benchmarks (a multiply-add counts 2 FLOPs), and their
reconciliation with the paper's Table 2.

The cost model itself (:func:`patchmatch_flops`, :func:`enumerated_flops`: only the relevance scores of
Eq. 1 count, 2 * 9C FLOPs per query pixel and candidate) is the library's, ``amsa.matching.schedule``;
this module adds the official-style PatchMatch's count and the Table 2 reconciliation.
"""

from __future__ import annotations

from collections.abc import Sequence

from amsa.matching.schedule import NEIGHBOURS, enumerated_flops, patchmatch_flops

__all__ = ["OFFICIAL_CANDIDATES_PER_STEP", "REF_SCALES", "enumerated_flops", "official_patchmatch_flops",
           "patchmatch_flops", "ref_sizes", "table2"]

# Candidates the official-style PatchMatch scores per step: two sets of 9 ([B, 9, 9C, H*W] each), the
# own match re-scored in both (LR propagation: own + 8 neighbours' matches; Ref: new own + 8 around it).
OFFICIAL_CANDIDATES_PER_STEP = 2 * (len(NEIGHBOURS) + 1)

# The paper's multi-scale references: n = 5 scales, each 0.8 times the previous one.
REF_SCALES = tuple(0.8**i for i in range(5))


def official_patchmatch_flops(batch: int, channels: int, size: tuple[int, int], iters: Sequence[int],
                              refs: int = 1) -> int:
    """FLOPs of the official-style PatchMatch (bench.baselines.official_patchmatch): the same schedule,
    18 candidates per step since the own match is re-scored in both 9-candidate sets."""
    return patchmatch_flops(batch, channels, size, iters, refs,
                            candidates_per_step=OFFICIAL_CANDIDATES_PER_STEP)


def ref_sizes(size: int, refs: int) -> list[tuple[int, int]]:
    """Sizes of the benchmarks' ``refs`` reference maps: the paper's scales 0.8^i of a size x size map."""
    return [(round(size * s), round(size * s)) for s in REF_SCALES[:refs]]


def table2() -> list[dict]:
    """The paper's Table 2 matching costs at 250x250, C = 256, next to analytic counts.

    The paper's figures are multiply-adds (MACs) of the matching alone, on the official code's unpadded
    finest map (248 x 248), with the MSDA lines 3.3616 = sum_i 0.8^i times the single-reference ones
    (cost taken linear in the reference scale): 248^4 * 2304 = 8715.44 G exactly, times 3.3616 = 29297.82.
    Our counts are FLOPs (2 per MAC) on the padded 250 x 250 map, the five references with their true
    areas (0.8^(2i))."""
    C, S = 256, 250
    linear = sum(REF_SCALES)
    enum_1 = 248**4 * 9 * C / 1e9  # GMACs, reproduces 8715.44
    # The closest convention we found for 83.15 (within 1 %): the official code's 18 candidates per step
    # and its dilations k = 1 .. 16, fixed from the finest map (2^floor(log2(247 // 8)) = 16) on every level.
    official_cfe_1 = patchmatch_flops(1, C, (248, 248), (1, 1, 2, 6), candidates_per_step=18,
                                      scored_on_entry=0, steps_per_iteration=5) / 2 / 1e9
    return [
        {"line": "enumerated, 1 ref", "paper": 8715.44, "paper_rule_gmac": enum_1,
         "ours_gflop": enumerated_flops(1, C, (S, S), ref_sizes(S, 1)) / 1e9},
        {"line": "enumerated, 5 refs (MSDA)", "paper": 29297.82, "paper_rule_gmac": enum_1 * linear,
         "ours_gflop": enumerated_flops(1, C, (S, S), ref_sizes(S, 5)) / 1e9},
        {"line": "CFE-PatchMatch 1-1-2-6, 1 ref", "paper": 83.15, "paper_rule_gmac": official_cfe_1,
         "ours_gflop": patchmatch_flops(1, C, (S, S), (1, 1, 2, 6)) / 1e9},
        {"line": "CFE-PatchMatch 1-1-2-6, 5 refs (MSDA)", "paper": 279.52,
         "paper_rule_gmac": official_cfe_1 * linear,
         "ours_gflop": patchmatch_flops(1, C, (S, S), (1, 1, 2, 6), refs=5) / 1e9},
    ]
