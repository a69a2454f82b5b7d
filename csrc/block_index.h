// The block-sparse layout both kernel files read: CSR offsets per output block-row and the column block of each kept
// block. Indices pointing outside the blocks or the input would read out of bounds, so the ops check them first.
#pragma once

#include <cstdint>

namespace superblock {

// Whether `offsets` (block_rows + 1 of them) and `cols` (kept of them) index `kept` blocks in order, each column
// below `column_blocks` (a pass over the indices).
inline bool indexes_blocks(const int32_t* offsets, int64_t block_rows, const int32_t* cols, int64_t kept,
                           int64_t column_blocks) {
  bool ok = offsets[0] == 0 && offsets[block_rows] == kept;
  for (int64_t r = 0; ok && r < block_rows; ++r) ok = offsets[r] <= offsets[r + 1];
  for (int64_t j = 0; ok && j < kept; ++j) ok = cols[j] >= 0 && cols[j] < column_blocks;
  return ok;
}

}  // namespace superblock
