//! CRC32C arithmetic: the checksum of two byte runs joined, from their two checksums and the
//! second run's length, without touching the bytes.
//!
//! A daemon uses it to answer a read with the CRC32C its bytes must have, built from the
//! per-block checksums the store already keeps, so serving a read costs no pass over the data;
//! the reader checks the bytes against it, which covers the drive, the daemon's memory and the
//! wire in one check (ARCHITECTURE decision 33).
//!
//! The math: CRC32C's register update is linear over GF(2), and the initial value and the final
//! XOR cancel when two runs are joined, so `crc(A ‖ B) = Z_|B|(crc(A)) ⊕ crc(B)`, where `Z_n` is
//! the register after feeding `n` zero bytes (no init, no final XOR): a 32×32 bit matrix.
//! `Z_n` for any `n` is composed from the matrices for powers of two; the one for the store's
//! checksum block size, used on every read, is also kept as byte tables (four lookups).

use std::sync::OnceLock;

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// A linear map on the CRC register, as the images of the 32 basis vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Matrix([u32; 32]);

impl Matrix {
    fn apply(&self, mut vector: u32) -> u32 {
        let mut out = 0;
        let mut bit = 0;
        while vector != 0 {
            if vector & 1 != 0 {
                out ^= self.0[bit];
            }
            vector >>= 1;
            bit += 1;
        }
        out
    }

    /// `self` after `first`.
    fn after(&self, first: &Matrix) -> Matrix {
        Matrix(first.0.map(|column| self.apply(column)))
    }

    /// Feeding one zero byte.
    fn one_zero_byte() -> Matrix {
        let mut columns = [0u32; 32];
        for (bit, column) in columns.iter_mut().enumerate() {
            let mut state = 1u32 << bit;
            for _ in 0..8 {
                state = if state & 1 != 0 {
                    (state >> 1) ^ POLY
                } else {
                    state >> 1
                };
            }
            *column = state;
        }
        Matrix(columns)
    }
}

/// `Z_{2^k}` for k = 0..64.
fn powers() -> &'static [Matrix; 64] {
    static POWERS: OnceLock<[Matrix; 64]> = OnceLock::new();
    POWERS.get_or_init(|| {
        let mut powers = [Matrix::one_zero_byte(); 64];
        for k in 1..64 {
            powers[k] = powers[k - 1].after(&powers[k - 1]);
        }
        powers
    })
}

/// The register after `len` zero bytes from `crc` (no init, no final XOR).
fn zeros(mut crc: u32, len: u64) -> u32 {
    let powers = powers();
    let mut remaining = len;
    let mut k = 0;
    while remaining != 0 && crc != 0 {
        if remaining & 1 != 0 {
            crc = powers[k].apply(crc);
        }
        remaining >>= 1;
        k += 1;
    }
    crc
}

/// The CRC32C of `A ‖ B` from `crc(A)`, `crc(B)` and `|B|`. `crc(∅)` is 0, so folding pieces
/// into an accumulator that starts at 0 gives the CRC32C of them all.
pub fn crc32c_append(first: u32, second: u32, second_len: u64) -> u32 {
    zeros(first, second_len) ^ second
}

/// [`crc32c_append`] for one fixed second length, by table: what a store uses for its
/// checksum block size.
#[derive(Clone)]
pub struct Appender {
    len: u64,
    tables: Box<[[u32; 256]; 4]>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender").field("len", &self.len).finish()
    }
}

impl Appender {
    pub fn new(len: u64) -> Appender {
        let mut tables = Box::new([[0u32; 256]; 4]);
        for (byte, table) in tables.iter_mut().enumerate() {
            for (value, entry) in table.iter_mut().enumerate() {
                *entry = zeros((value as u32) << (8 * byte), len);
            }
        }
        Appender { len, tables }
    }

    /// The CRC32C of `A ‖ B` from `crc(A)` and `crc(B)`, for `|B|` of `len` (else the slow way).
    pub fn append(&self, first: u32, second: u32, second_len: u64) -> u32 {
        if second_len != self.len {
            return crc32c_append(first, second, second_len);
        }
        let t = &self.tables;
        t[0][(first & 0xff) as usize]
            ^ t[1][((first >> 8) & 0xff) as usize]
            ^ t[2][((first >> 16) & 0xff) as usize]
            ^ t[3][(first >> 24) as usize]
            ^ second
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::crc32c;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn appending_equals_the_crc_of_the_joined_bytes() {
        let data = bytes(3 * 4096 + 77, 1);
        let lengths = [0usize, 1, 2, 3, 7, 100, 4095, 4096, 4097, 8191, 12_365];
        for &split in &lengths {
            for &second in &lengths {
                if split + second > data.len() {
                    continue;
                }
                let (a, b) = (&data[..split], &data[split..split + second]);
                let joined = crc32c(&data[..split + second]);
                assert_eq!(
                    crc32c_append(crc32c(a), crc32c(b), b.len() as u64),
                    joined,
                    "split {split} + {second}"
                );
            }
        }
    }

    #[test]
    fn folding_blocks_from_zero_gives_the_whole_crc() {
        let data = bytes(64 * 4096 + 1234, 2);
        let appender = Appender::new(4096);
        let folded = data.chunks(4096).fold(0, |acc, block| {
            appender.append(acc, crc32c(block), block.len() as u64)
        });
        assert_eq!(folded, crc32c(&data));
    }

    #[test]
    fn the_table_and_the_matrices_agree() {
        let appender = Appender::new(4096);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..1000 {
            let (a, b) = (rng.u32(..), rng.u32(..));
            assert_eq!(appender.append(a, b, 4096), crc32c_append(a, b, 4096));
        }
    }

    #[test]
    fn lengths_past_four_gib_are_handled() {
        // Z_{2^33} is Z_{2^32} twice.
        let a = 0x1234_5678;
        let twice = zeros(zeros(a, 1 << 32), 1 << 32);
        assert_eq!(zeros(a, 1 << 33), twice);
    }
}
