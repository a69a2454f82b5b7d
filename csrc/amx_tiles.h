// Our own AMX product of one block-row of a block-sparse weight, for CPUs with AMX: bfloat16 (float accumulators)
// and uint8 x int8 (int32 accumulators).
//
// ATen's brgemm (oneDNN) runs one call per kept block, or per gathered panel of them: at 90% sparsity a block-row
// keeps one or two blocks of 64 inputs, so each call is a short product that loads its accumulators from memory,
// adds a few tile products to them and stores them again, and most of the time goes to that round trip. Here the
// accumulators stay in tile registers across every kept block of the row and are stored once. The input's column
// blocks are read in place (a tile load takes any row stride) and the weight blocks in the layout the packing
// writes for the dot-product instructions, which is AMX's layout for B: per block, rows of 4 bytes per output
// (bfloat16: [b/2][b][2] pairs; int8: [b/4][b][4] quads).
//
// Tiles: 0-3 the accumulators of 32 tokens x 32 outputs (two row tiles of 16 tokens, two column tiles of 16
// outputs), 4-5 the input (16 tokens x `step` bytes each: 32 bfloat16 or 64 uint8), 6-7 the weight (step / 4 rows of
// 16 outputs). Accumulation runs block after block and, in a block, in steps of `step` bytes of input, the order of
// one brgemm call per block, so bfloat16 gives the same bits as those calls; int32 sums are exact in any order.
//
// Linux lends a process the tile registers only once it asks (arch_prctl); where it refuses, or the CPU lacks AMX,
// or SUPERBLOCK_HIDE_ISA names "amx", amx_runs() is false and callers keep their other kernels. Functions carry
// their target attributes, so the file builds on any x86 CPU.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "avx512_float.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define SUPERBLOCK_AMX_BUILDS 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SUPERBLOCK_AMX __attribute__((target("amx-tile,amx-bf16,amx-int8")))
#endif

namespace superblock {

enum class TileProduct { bfloat16, u8s8 };  // _tile_dpbf16ps (float sums), _tile_dpbusd (int32 sums)

#if defined(SUPERBLOCK_AMX_BUILDS)

// Whether this process may run AMX tile instructions: the CPU has them and Linux granted the tile data state
// (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; asking twice is harmless).
inline bool amx_runs() {
  static const bool yes = [] {
    if (hidden_by_environment("amx") || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("amx-int8")) {
      return false;
    }
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

// Loads the configuration for `first` tokens in the first row tile, `second` (0 to 16) in the other, and input
// steps of `step` bytes (64 or 32).
SUPERBLOCK_AMX inline void configure_tiles(int first, int second, int step) {
  TileConfig config;
  const int token_rows[2] = {first, second};
  for (int t = 0; t < 4; ++t) {  // accumulators: 16 four-byte sums per row
    config.rows[t] = uint8_t(token_rows[t / 2]);
    config.bytes_per_row[t] = token_rows[t / 2] ? 64 : 0;
  }
  for (int t = 4; t < 6; ++t) {
    config.rows[t] = uint8_t(token_rows[t - 4]);
    config.bytes_per_row[t] = token_rows[t - 4] ? step : 0;
  }
  for (int t = 6; t < 8; ++t) {  // weights: step / 4 rows of 16 outputs x 4 bytes
    config.rows[t] = uint8_t(step / 4);
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// acc[0:tokens, n0:n0+32] (row stride acc_bytes; four-byte sums) = the input rows x (row stride x_bytes) times the
// kept blocks, block j reading input bytes cols[j] * block_input_bytes onwards and its weights at blocks + j *
// block_bytes (row stride weight_row_bytes). kSecond: a second row tile of tokens.
template <TileProduct kKind, bool kSecond>
SUPERBLOCK_AMX inline void amx_columns(const uint8_t* x, int64_t x_bytes, const uint8_t* blocks, int64_t block_bytes,
                                       int64_t block_input_bytes, int64_t weight_row_bytes, const int32_t* cols,
                                       int64_t kept, int64_t n0, uint8_t* acc, int64_t acc_bytes, int step) {
  const int64_t step_weight_bytes = (step / 4) * weight_row_bytes;
  _tile_zero(0);
  _tile_zero(1);
  if (kSecond) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t j = 0; j < kept; ++j) {
    const uint8_t* input = x + (cols ? cols[j] : 0) * block_input_bytes;
    const uint8_t* weights = blocks + j * block_bytes + n0 * 4;
    for (int64_t k = 0; k < block_input_bytes; k += step, weights += step_weight_bytes) {
      _tile_loadd(4, input + k, x_bytes);
      _tile_loadd(6, weights, weight_row_bytes);
      _tile_loadd(7, weights + 64, weight_row_bytes);
      if constexpr (kKind == TileProduct::bfloat16) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      } else {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
      }
      if (kSecond) {
        _tile_loadd(5, input + 16 * x_bytes + k, x_bytes);
        if constexpr (kKind == TileProduct::bfloat16) {
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        } else {
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
      }
    }
  }
  uint8_t* out = acc + n0 * 4;
  _tile_stored(0, out, acc_bytes);
  _tile_stored(1, out + 64, acc_bytes);
  if (kSecond) {
    _tile_stored(2, out + 16 * acc_bytes, acc_bytes);
    _tile_stored(3, out + 16 * acc_bytes + 64, acc_bytes);
  }
}

// acc (m x n four-byte sums, row stride acc_stride elements) = the sum over `kept` blocks j of x[:, cols[j] * k :
// (cols[j] + 1) * k] @ block j, x having m rows of element type In (row stride x_stride elements) and each block
// k x n, packed (of In's size, or int8 for uint8 input; one after the other from `blocks`), 32 tokens at a time.
// cols null: one block, reading x's first k columns (a dense product). k * sizeof(In) must be a multiple of 32 and n
// of 32. The tiles are configured here, so the caller releases them (cpublas::brgemm_release, which also tells
// ATen's brgemm to configure its own again) before ATen's brgemm runs on this thread.
template <TileProduct kKind, typename In, typename Sum>
SUPERBLOCK_AMX inline void amx_product(const In* x, int64_t x_stride, int64_t m, const void* blocks,
                                       const int32_t* cols, int64_t kept, int64_t k, int64_t n, Sum* acc,
                                       int64_t acc_stride) {
  const int64_t block_input_bytes = k * int64_t(sizeof(In));
  const int step = block_input_bytes % 64 == 0 ? 64 : 32;
  const auto* x_bytes = reinterpret_cast<const uint8_t*>(x);
  const auto* block_bytes = static_cast<const uint8_t*>(blocks);
  auto* acc_bytes = reinterpret_cast<uint8_t*>(acc);
  int configured = -1;
  for (int64_t r0 = 0; r0 < m; r0 += 32) {
    const int rows = int(std::min<int64_t>(32, m - r0));
    if (rows != configured) {
      configure_tiles(std::min(rows, 16), std::max(rows - 16, 0), step);
      configured = rows;
    }
    const uint8_t* x_rows = x_bytes + r0 * x_stride * int64_t(sizeof(In));
    uint8_t* acc_rows = acc_bytes + r0 * acc_stride * 4;
    for (int64_t n0 = 0; n0 < n; n0 += 32) {
      if (rows > 16) {
        amx_columns<kKind, true>(x_rows, x_stride * sizeof(In), block_bytes, n * block_input_bytes,
                                 block_input_bytes, n * 4, cols, kept, n0, acc_rows, acc_stride * 4, step);
      } else {
        amx_columns<kKind, false>(x_rows, x_stride * sizeof(In), block_bytes, n * block_input_bytes,
                                  block_input_bytes, n * 4, cols, kept, n0, acc_rows, acc_stride * 4, step);
      }
    }
  }
}

// One block-row of a block-sparse weight: its `kept` square blocks of `blocksize` (see amx_product).
template <TileProduct kKind, typename In, typename Sum>
SUPERBLOCK_AMX inline void amx_block_row_product(const In* x, int64_t x_stride, int64_t m, const void* blocks,
                                                 const int32_t* cols, int64_t kept, int64_t blocksize, Sum* acc,
                                                 int64_t acc_stride) {
  amx_product<kKind>(x, x_stride, m, blocks, cols, kept, blocksize, blocksize, acc, acc_stride);
}

#else

inline bool amx_runs() { return false; }

template <TileProduct kKind, typename In, typename Sum>
inline void amx_product(const In*, int64_t, int64_t, const void*, const int32_t*, int64_t, int64_t, int64_t, Sum*,
                        int64_t) {
  TORCH_CHECK(false, "amx_product: AMX needs an x86 CPU running Linux and GCC 11 or Clang 12 or later");
}

template <TileProduct kKind, typename In, typename Sum>
inline void amx_block_row_product(const In*, int64_t, int64_t, const void*, const int32_t*, int64_t, int64_t, Sum*,
                                  int64_t) {
  TORCH_CHECK(false, "amx_block_row_product: AMX needs an x86 CPU running Linux and GCC 11 or Clang 12 or later");
}

#endif

}  // namespace superblock
