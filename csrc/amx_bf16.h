// Our own AMX bfloat16 product of one block-row of a block-sparse weight, for CPUs with AMX.
//
// ATen's brgemm (oneDNN) runs one call per kept block: at 90% sparsity a block-row keeps one or two blocks of 64
// inputs, so each call is a product of depth 64 that loads its float accumulators from memory, adds two tile
// products to them and stores them again, and most of the time goes to that round trip. Here the accumulators stay
// in tile registers across every kept block of the row and are stored once. The input's column blocks are read in
// place (a tile load takes any row stride) and the weight blocks in the pair-interleaved layout that
// fused_pack_blocks writes ([b/2][b][2] per block), which is AMX's layout for B.
//
// Tiles: 0-3 the float accumulators of 32 tokens x 32 outputs (two row tiles of 16 tokens, two column tiles of 16
// outputs), 4-5 the input (16 tokens x 32 bfloat16 each), 6-7 the weight (16 pairs x 16 outputs each).
//
// Linux lends a process the tile registers only once it asks (arch_prctl); where it refuses, or the CPU lacks AMX,
// or SUPERBLOCK_HIDE_ISA names "amx", amx_bf16_runs() is false and the caller keeps ATen's brgemm. Functions carry
// their target attributes, so the file builds on any x86 CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "avx512_float.h"

#define SUPERBLOCK_AMX_BF16 __attribute__((target("amx-tile,amx-bf16")))

namespace superblock {

// Whether this process may run AMX tile instructions: the CPU has them (oneDNN packs bfloat16 for AMX) and Linux
// granted the tile data state (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; asking twice is harmless).
inline bool amx_bf16_runs() {
  static const bool yes = [] {
    if (hidden_by_environment("amx") || !at::native::cpublas::could_pack(at::kBFloat16)) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return yes;
}

// The 64-byte operand of ldtilecfg (palette 1): bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration for `first` tokens in the first row tile and `second` (0 to 16) in the other.
SUPERBLOCK_AMX_BF16 inline void configure_tiles(int first, int second) {
  TileConfig config;
  const int token_rows[4] = {first, first, second, second};
  for (int t = 0; t < 4; ++t) {  // accumulators: 16 floats per row
    config.rows[t] = uint8_t(token_rows[t]);
    config.bytes_per_row[t] = token_rows[t] ? 64 : 0;
  }
  config.rows[4] = uint8_t(first);  // inputs: 32 bfloat16 per row
  config.bytes_per_row[4] = 64;
  config.rows[5] = uint8_t(second);
  config.bytes_per_row[5] = second ? 64 : 0;
  for (int t = 6; t < 8; ++t) {  // weights: 16 rows of 16 pairs
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// acc[0:tokens, n0:n0+32] (row stride acc_stride floats) = the input rows x (row stride x_stride) times the
// block-row's kept blocks `blocks[j]` (pair-interleaved, b x b), each reading input columns cols[j] * b onwards.
// kSecond: whether a second row tile of tokens (16 + up to 16) is computed.
template <bool kSecond>
SUPERBLOCK_AMX_BF16 inline void amx_columns(const at::BFloat16* x, int64_t x_stride, const at::BFloat16* blocks,
                                            const int32_t* cols, int64_t kept, int64_t b, int64_t n0, float* acc,
                                            int64_t acc_stride) {
  const int64_t x_bytes = x_stride * 2, pair_row_bytes = b * 4;
  _tile_zero(0);
  _tile_zero(1);
  if (kSecond) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t j = 0; j < kept; ++j) {
    const at::BFloat16* input = x + cols[j] * b;
    const at::BFloat16* block = blocks + j * b * b + n0 * 2;
    for (int64_t k0 = 0; k0 < b; k0 += 32) {
      const at::BFloat16* weights = block + (k0 / 2) * b * 2;
      _tile_loadd(4, input + k0, x_bytes);
      _tile_loadd(6, weights, pair_row_bytes);
      _tile_loadd(7, weights + 32, pair_row_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (kSecond) {
        _tile_loadd(5, input + 16 * x_stride + k0, x_bytes);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  const int64_t acc_bytes = acc_stride * 4;
  _tile_stored(0, acc + n0, acc_bytes);
  _tile_stored(1, acc + n0 + 16, acc_bytes);
  if (kSecond) {
    _tile_stored(2, acc + 16 * acc_stride + n0, acc_bytes);
    _tile_stored(3, acc + 16 * acc_stride + n0 + 16, acc_bytes);
  }
}

// acc (m x b floats, row stride acc_stride) = x (m rows, row stride x_stride) @ the block-row's `kept` blocks
// (b a multiple of 32), 32 tokens at a time. The tiles are configured here, so the caller must release them
// (cpublas::brgemm_release, which also tells ATen's brgemm to configure its own again) before ATen's brgemm runs on
// this thread.
SUPERBLOCK_AMX_BF16 inline void amx_block_row_product(const at::BFloat16* x, int64_t x_stride, int64_t m,
                                                      const at::BFloat16* blocks, const int32_t* cols, int64_t kept,
                                                      int64_t b, float* acc, int64_t acc_stride) {
  int configured = -1;
  for (int64_t r0 = 0; r0 < m; r0 += 32) {
    const int rows = int(std::min<int64_t>(32, m - r0));
    if (rows != configured) {
      configure_tiles(std::min(rows, 16), std::max(rows - 16, 0));
      configured = rows;
    }
    const at::BFloat16* x_rows = x + r0 * x_stride;
    float* acc_rows = acc + r0 * acc_stride;
    for (int64_t n0 = 0; n0 < b; n0 += 32) {
      if (rows > 16) {
        amx_columns<true>(x_rows, x_stride, blocks, cols, kept, b, n0, acc_rows, acc_stride);
      } else {
        amx_columns<false>(x_rows, x_stride, blocks, cols, kept, b, n0, acc_rows, acc_stride);
      }
    }
  }
}

}  // namespace superblock

#else
namespace superblock {
inline bool amx_bf16_runs() { return false; }
inline void amx_block_row_product(const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, const int32_t*, int64_t,
                                  int64_t, float*, int64_t) {
  TORCH_CHECK(false, "amx_block_row_product: AMX needs an x86 CPU running Linux");
}
}  // namespace superblock
#endif
