"""Resident warps per SM that a kernel's registers, shared memory and block size allow.

Limits from the CUDA occupancy calculator for compute capability 8.0 (A100) and 9.0 (H100/H200):
64K 32-bit registers per SM, allocated per warp in units of 256; at most 64 warps and 32 blocks
per SM; 164 KiB (8.0) / 228 KiB (9.0) of shared memory per SM, of which one block may use at most
163 / 227 KiB, plus 1 KiB the system reserves per block.
"""

from __future__ import annotations

_LIMITS = {  # cc: (shared bytes per SM, max shared bytes per block)
    80: (164 * 1024, 163 * 1024),
    90: (228 * 1024, 227 * 1024),
}
_REGS_PER_SM, _REG_UNIT, _MAX_WARPS, _MAX_BLOCKS, _RESERVED_SHARED = 65536, 256, 64, 32, 1024


def shared_limit(cc: int) -> int:
    return _LIMITS[cc][1]


def occupancy(cc: int, registers: int, shared: int, warps: int) -> dict:
    """{"blocks_per_sm", "occupancy"} (resident warps / 64); 0 blocks when it cannot launch."""
    per_sm, per_block = _LIMITS[cc]
    warp_regs = -(-registers * 32 // _REG_UNIT) * _REG_UNIT
    by_regs = _REGS_PER_SM // (warp_regs * warps) if registers else _MAX_BLOCKS
    by_shared = per_sm // (shared + _RESERVED_SHARED) if shared <= per_block else 0
    blocks = min(by_regs, by_shared, _MAX_WARPS // warps, _MAX_BLOCKS)
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * warps / _MAX_WARPS, 3)}
