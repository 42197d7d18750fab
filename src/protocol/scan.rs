//! The byte-array decoder: a firmware chunk's `[137,80,78,…]` decoded 64
//! characters at a time (AVX2 on x86_64, NEON on aarch64, SWAR elsewhere),
//! and base64.

use base64::Engine as _;

pub(crate) fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// `s[i]` is `[`: a byte array whose every element is a JSON integer in
/// 0..=255 without sign, fraction or exponent, and the index after its `]`;
/// `None` for anything else.
pub(crate) fn scan_byte_array(s: &[u8], mut i: usize) -> Option<(Vec<u8>, usize)> {
    let ws = is_ws;
    let n = s.len();
    if s.get(i) != Some(&b'[') {
        return None;
    }
    i += 1;
    // Room for the usual case: an element of random bytes (a JPEG) takes
    // 3.6 characters on average, and the block decoder appends 72 at a
    // time. Small values (two characters each at least) make it grow. It
    // was sized for the worst case, half the text: a 1 KiB allocation for
    // a 512 B chunk, and 2,048 of them wait in the ingest queue at a
    // burst's peak.
    let mut out = Vec::with_capacity((n - i) * 2 / 7 + 80);
    // Compact firmware output (`[255,216,…]`) is taken in blocks (see
    // `scan_compact`); the last element, whitespace or anything unusual is
    // left to the loop below, at the same element, so the result is the same
    // either way.
    i = scan_compact(s, i, &mut out);
    loop {
        while i < n && ws(s[i]) {
            i += 1;
        }
        let c = *s.get(i)?;
        if c == b']' && out.is_empty() {
            i += 1;
            break;
        }
        if !c.is_ascii_digit() {
            return None;
        }
        let mut v = u32::from(c - b'0');
        i += 1;
        if c != b'0' {
            // At most two more digits.
            for _ in 0..2 {
                match s.get(i) {
                    Some(d) if d.is_ascii_digit() => {
                        v = v * 10 + u32::from(d - b'0');
                        i += 1;
                    }
                    _ => break,
                }
            }
        }
        // A further digit (or a leading zero followed by one), a fraction or
        // an exponent: not canonical, let serde decide.
        if v > 255 || matches!(s.get(i), Some(b'0'..=b'9' | b'.' | b'e' | b'E')) {
            return None;
        }
        out.push(v as u8);
        while i < n && ws(s[i]) {
            i += 1;
        }
        match s.get(i)? {
            b',' => i += 1,
            b']' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    // Sized for two characters per element; random image bytes take about
    // 3.6, and the bytes then wait in the ingest queue and the commit
    // batch: the unused half goes back (an in-place shrink).
    if out.capacity() - out.len() > out.len() / 4 + 16 {
        out.shrink_to_fit();
    }
    Some((out, i))
}

pub(crate) const LO7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
pub(crate) const HI: u64 = 0x8080_8080_8080_8080;
pub(crate) const ONES: u64 = 0x0101_0101_0101_0101;

/// One bit per byte of `hi` (bit k = the high bit of byte k).
#[inline]
pub(crate) fn movemask(hi: u64) -> u64 {
    (((hi >> 7) & ONES).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// Which of the 8 bytes of `w` are commas and which are digits, one bit each.
#[inline]
pub(crate) fn commas_and_digits(w: u64) -> (u64, u64) {
    let x = w ^ (ONES * u64::from(b','));
    // High bit set exactly where a byte of `x` is zero (no carries).
    let comma = !(((x & LO7) + LO7) | x | LO7);
    let t = w ^ (ONES * 0x30);
    // High bit set where a byte of `t` is not 0..=9.
    let non_digit = (((t & LO7) + ONES * 0x76) | t) & HI;
    (movemask(comma), movemask(!non_digit & HI))
}

/// Which of the 64 bytes of `b` are commas and which are digits, one bit
/// each (bit k = byte k).
#[inline]
pub(crate) fn block_masks(b: &[u8; 64]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        block_masks_sse2(b)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        block_masks_swar(b)
    }
}

/// [`block_masks`] eight bytes at a time in `u64`s (any target).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline]
pub(crate) fn block_masks_swar(b: &[u8; 64]) -> (u64, u64) {
    let (mut commas, mut digits) = (0u64, 0u64);
    for k in 0..8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8 * k..8 * k + 8]);
        let (c, d) = commas_and_digits(u64::from_le_bytes(w));
        commas |= c << (8 * k);
        digits |= d << (8 * k);
    }
    (commas, digits)
}

/// [`block_masks`] sixteen bytes at a time with SSE2, which every x86_64
/// CPU has: a compare and a movemask per mask instead of the SWAR words'
/// dozen operations (the mask computation was about a third of the scan).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn block_masks_sse2(b: &[u8; 64]) -> (u64, u64) {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8,
        _mm_set1_epi8,
    };
    let (mut commas, mut digits) = (0u64, 0u64);
    // SAFETY: SSE2 is part of the x86_64 baseline; each load reads 16 bytes
    // inside `b` (unaligned loads are allowed).
    unsafe {
        let comma = _mm_set1_epi8(b',' as i8);
        // Digits '0'..='9' (0x30..=0x39) moved to -128..=-119, so one signed
        // compare finds them.
        let shift = _mm_set1_epi8((0x80u8.wrapping_sub(b'0')) as i8);
        let limit = _mm_set1_epi8((-128i8).wrapping_add(10));
        for k in 0..4 {
            let v = _mm_loadu_si128(b.as_ptr().add(16 * k) as *const __m128i);
            let c = _mm_movemask_epi8(_mm_cmpeq_epi8(v, comma)) as u16;
            let d = _mm_movemask_epi8(_mm_cmplt_epi8(_mm_add_epi8(v, shift), limit)) as u16;
            commas |= u64::from(c) << (16 * k);
            digits |= u64::from(d) << (16 * k);
        }
    }
    (commas, digits)
}

/// The elements of a compact byte array (`255,216,0,…`, from `start`), 64
/// bytes at a time: the block's commas and digits become bit masks, and each
/// element's value is read from the four bytes before its comma, so no
/// element waits for the previous one's length (a byte-at-a-time scan
/// mispredicts on the random digit counts and a word-at-a-time one is one
/// long dependency chain). Returns where the first element it did not take
/// starts: the array's last element, whitespace or anything else unusual is
/// left to the caller. If any element it took is not canonical JSON for
/// 0..=255 (empty, leading zero, over 255), it takes nothing.
///
/// A block's elements are decoded all at once with AVX2 where the CPU has
/// it (checked once, then cached by `std`) and with NEON on aarch64 (every
/// 64-bit Raspberry Pi), one at a time otherwise.
pub(crate) fn scan_compact(s: &[u8], start: usize, out: &mut Vec<u8>) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { scan_compact_avx2(s, start, out) };
    }
    #[cfg(target_arch = "aarch64")]
    {
        scan_blocks(s, start, out, decode_elements_neon)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        scan_blocks(s, start, out, decode_elements)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn scan_compact_avx2(s: &[u8], start: usize, out: &mut Vec<u8>) -> usize {
    // SAFETY (of the closure): the caller checked AVX2 (the decoder checks
    // its bounds itself).
    scan_blocks(s, start, out, |s, block, elem, commas, vals| unsafe {
        decode_elements_avx2(s, block, elem, commas, vals)
    })
}

/// The block walk shared by the element decoders (see [`scan_compact`]).
/// `decode(s, block, elem, commas, vals)` decodes the elements whose commas
/// are the bits of `commas` (never 0; bit k = the byte at `block + k`; the
/// element before the first comma starts at `elem`) into `vals`, and
/// returns how many and whether any was not canonical.
#[inline(always)]
pub(crate) fn scan_blocks(
    s: &[u8],
    start: usize,
    out: &mut Vec<u8>,
    decode: impl Fn(&[u8], usize, usize, u64, &mut [u8; 72]) -> (usize, bool),
) -> usize {
    // Each element is read from the four bytes before its comma; an array
    // that close to the start of the message (never a real chunk's) is
    // left to the caller.
    if start < 4 {
        return start;
    }
    let taken_before = out.len();
    let mut elem = start;
    let mut block = start;
    let mut bad = false;
    // At most one element per comma, 64 per block: collected here and
    // appended once per block (8 spare bytes for the eight-wide stores).
    let mut vals = [0u8; 72];
    while block + 64 <= s.len() {
        let mut b = [0u8; 64];
        b.copy_from_slice(&s[block..block + 64]);
        let (commas, digits) = block_masks(&b);
        // Only up to the first byte that is neither (usually the `]`).
        let clean = (!(commas | digits)).trailing_zeros();
        let m = if clean == 64 {
            commas
        } else {
            commas & ((1u64 << clean) - 1)
        };
        if m != 0 {
            let (k, b) = decode(s, block, elem, m, &mut vals);
            bad |= b;
            // All 72 bytes, then cut back to k: a fixed-size copy the
            // compiler inlines, where `&vals[..k]` was a memcpy call per
            // block (1 % of the machine in the 1,000-device wake).
            let len = out.len();
            out.extend_from_slice(&vals);
            out.truncate(len + k);
            // The next element starts after the block's last comma.
            elem = block + 64 - m.leading_zeros() as usize;
        }
        if clean < 64 {
            break;
        }
        block += 64;
    }
    if bad {
        out.truncate(taken_before);
        return start;
    }
    elem
}

/// One element at a time (any target).
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
pub(crate) fn decode_elements(
    s: &[u8],
    block: usize,
    mut elem: usize,
    mut m: u64,
    vals: &mut [u8; 72],
) -> (usize, bool) {
    let mut bad = false;
    let mut k = 0;
    while m != 0 {
        let comma = block + m.trailing_zeros() as usize;
        m &= m - 1;
        let len = comma - elem;
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[comma - 4..comma]);
        let d = u32::from_le_bytes(w) ^ 0x3030_3030;
        // The element's digits are the top `len` bytes; the rest go.
        // (A length outside 1..=3 is flagged below, whatever `sh` is.)
        let sh = 8 * (4usize.wrapping_sub(len) & 3) as u32;
        let m = d & (u32::MAX << sh);
        let v = (m >> 24) + ((m >> 16) & 0xFF) * 10 + ((m >> 8) & 0xFF) * 100;
        // Its first digit is the lowest kept byte: 0 with more after it
        // is a leading zero.
        let lead_zero = (len > 1) & ((d >> sh) & 0xFF == 0);
        bad |= (len.wrapping_sub(1) > 2) | lead_zero | (v > 255);
        vals[k & 63] = v as u8;
        k += 1;
        elem = comma + 1;
    }
    (k, bad)
}

/// For [`decode_elements_avx2`]: byte `i` of entry `m` is the index of
/// the `i`-th set bit of `m` (0x80, which `pshufb` turns into 0, past the
/// last one), so one shuffle gathers the bytes an 8-bit mask selects.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
static COMPRESS: [[u8; 8]; 256] = {
    let mut t = [[0x80u8; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut bit, mut n) = (0, 0);
        while bit < 8 {
            if m & (1 << bit) != 0 {
                t[m][n] = bit as u8;
                n += 1;
            }
            bit += 1;
        }
        m += 1;
    }
    t
};

/// All the elements of a block at once with AVX2, no loop over elements:
/// for every byte position q of the block, the vectors hold the four bytes
/// before it, so the value of the element a comma at q ends (its digits
/// are the byte before q and the up-to-two before that one) and whether it
/// is canonical are computed for all 64 positions with byte arithmetic;
/// then the values at the commas are packed together eight positions at a
/// time with one shuffle from [`COMPRESS`]. Same results as
/// [`decode_elements`] (proptest `vector_elements_match_scalar`).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn decode_elements_avx2(
    s: &[u8],
    block: usize,
    _elem: usize,
    m: u64,
    vals: &mut [u8; 72],
) -> (usize, bool) {
    use std::arch::x86_64::*;
    // The loads below read s[block - 4 .. block + 64] (`scan_blocks` never
    // asks for more; one compare per block keeps that out of the caller's
    // hands).
    assert!(block >= 4 && block + 64 <= s.len());
    let zero = _mm256_set1_epi8(b'0' as i8);
    let nine = _mm256_set1_epi8(9);
    let (two, k3, five, six) = (
        _mm256_set1_epi8(2),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(5),
        _mm256_set1_epi8(6),
    );
    let nul = _mm256_setzero_si256();
    // Byte minus '0', and where that is a digit (0..=9, unsigned).
    let digit = |p: *const u8| {
        let d = _mm256_sub_epi8(_mm256_loadu_si256(p as *const __m256i), zero);
        (d, _mm256_cmpeq_epi8(_mm256_min_epu8(d, nine), d))
    };
    // x >= k, unsigned bytes.
    let at_least = |x, k| _mm256_cmpeq_epi8(_mm256_max_epu8(x, k), x);
    let mut value = [0u8; 64];
    let mut bad_at = 0u64;
    for half in 0..2 {
        let q = s.as_ptr().add(block + 32 * half);
        // d1: the element's last digit (the byte before the comma), d2 the
        // one before, d3 the one before that; the fourth byte back must
        // not be a digit.
        let (d1, is1) = digit(q.sub(1));
        let (d2, is2) = digit(q.sub(2));
        let (d3, is3) = digit(q.sub(3));
        let (_, is4) = digit(q.sub(4));
        let two_plus = _mm256_and_si256(is1, is2);
        let three_plus = _mm256_and_si256(two_plus, is3);
        let three = _mm256_andnot_si256(is4, three_plus); // exactly three
        let two_only = _mm256_andnot_si256(is3, two_plus);
        // Wrapping byte arithmetic (AVX2 has no byte multiply: 10·x = 8x +
        // 2x, 100·y = 64y + 32y + 4y by doublings): right whenever the
        // value is ≤ 255, and a value over 255 is flagged below anyway.
        let x2 = _mm256_add_epi8(d2, d2);
        let x8 = _mm256_add_epi8(_mm256_add_epi8(x2, x2), _mm256_add_epi8(x2, x2));
        let tens = _mm256_and_si256(two_plus, _mm256_add_epi8(x8, x2));
        let y4 = _mm256_add_epi8(_mm256_add_epi8(d3, d3), _mm256_add_epi8(d3, d3));
        let y32 = _mm256_add_epi8(
            _mm256_add_epi8(_mm256_add_epi8(y4, y4), _mm256_add_epi8(y4, y4)),
            _mm256_add_epi8(_mm256_add_epi8(y4, y4), _mm256_add_epi8(y4, y4)),
        );
        let hundreds = _mm256_and_si256(
            three_plus,
            _mm256_add_epi8(_mm256_add_epi8(y32, y32), _mm256_add_epi8(y32, y4)),
        );
        let v = _mm256_add_epi8(d1, _mm256_add_epi8(tens, hundreds));
        _mm256_storeu_si256(value.as_mut_ptr().add(32 * half) as *mut __m256i, v);
        // Not canonical: no digit, four or more, a leading zero, over 255
        // (three digits: 3xx.., 26x, 256..259).
        let over = _mm256_and_si256(
            three,
            _mm256_or_si256(
                at_least(d3, k3),
                _mm256_and_si256(
                    _mm256_cmpeq_epi8(d3, two),
                    _mm256_or_si256(
                        at_least(d2, six),
                        _mm256_and_si256(_mm256_cmpeq_epi8(d2, five), at_least(d1, six)),
                    ),
                ),
            ),
        );
        let lead_zero = _mm256_or_si256(
            _mm256_and_si256(two_only, _mm256_cmpeq_epi8(d2, nul)),
            _mm256_and_si256(three, _mm256_cmpeq_epi8(d3, nul)),
        );
        let bad = _mm256_or_si256(
            _mm256_or_si256(_mm256_andnot_si256(is1, _mm256_set1_epi8(-1)), over),
            _mm256_or_si256(lead_zero, _mm256_and_si256(three_plus, is4)),
        );
        bad_at |= u64::from(_mm256_movemask_epi8(bad) as u32) << (32 * half);
    }
    // The values at the commas, in order.
    let mut k = 0;
    for g in 0..8 {
        let sel = (m >> (8 * g)) as u8;
        let mut eight = [0u8; 8];
        eight.copy_from_slice(&value[8 * g..8 * g + 8]);
        let packed = _mm_shuffle_epi8(
            _mm_cvtsi64_si128(i64::from_le_bytes(eight)),
            _mm_cvtsi64_si128(i64::from_le_bytes(COMPRESS[usize::from(sel)])),
        );
        vals.as_mut_ptr()
            .add(k)
            .cast::<[u8; 8]>()
            .write_unaligned((_mm_cvtsi128_si64(packed) as u64).to_le_bytes());
        k += sel.count_ones() as usize;
    }
    (k, bad_at & m != 0)
}

/// [`decode_elements_avx2`] with NEON, sixteen positions at a time (NEON
/// has byte multiplies and an 8-byte table lookup, `vtbl1_u8`, for the
/// packing). Same results as [`decode_elements`] (proptest
/// `vector_elements_match_scalar`, run under qemu by `.ci/aarch64`).
#[cfg(target_arch = "aarch64")]
pub(crate) fn decode_elements_neon(
    s: &[u8],
    block: usize,
    _elem: usize,
    m: u64,
    vals: &mut [u8; 72],
) -> (usize, bool) {
    use std::arch::aarch64::*;
    // The loads below read s[block - 4 .. block + 64].
    assert!(block >= 4 && block + 64 <= s.len());
    let mut value = [0u8; 64];
    let mut bad_at = 0u64;
    let mut k = 0;
    // SAFETY: NEON is part of the aarch64 baseline; every load is inside
    // `s` (asserted above) and every store inside `value` or `vals`
    // (`k` + 8 ≤ 72).
    unsafe {
        let zero = vdupq_n_u8(b'0');
        let nine = vdupq_n_u8(9);
        let bit = vld1q_u8([1u8, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
        let digit = |p: *const u8| {
            let d = vsubq_u8(vld1q_u8(p), zero);
            (d, vcleq_u8(d, nine))
        };
        for quarter in 0..4 {
            let q = s.as_ptr().add(block + 16 * quarter);
            let (d1, is1) = digit(q.sub(1));
            let (d2, is2) = digit(q.sub(2));
            let (d3, is3) = digit(q.sub(3));
            let (_, is4) = digit(q.sub(4));
            let two_plus = vandq_u8(is1, is2);
            let three_plus = vandq_u8(two_plus, is3);
            let three = vbicq_u8(three_plus, is4); // exactly three
            let two_only = vbicq_u8(two_plus, is3);
            let tens = vandq_u8(two_plus, vmulq_u8(d2, vdupq_n_u8(10)));
            let hundreds = vandq_u8(three_plus, vmulq_u8(d3, vdupq_n_u8(100)));
            let v = vaddq_u8(d1, vaddq_u8(tens, hundreds));
            vst1q_u8(value.as_mut_ptr().add(16 * quarter), v);
            let over = vandq_u8(
                three,
                vorrq_u8(
                    vcgeq_u8(d3, vdupq_n_u8(3)),
                    vandq_u8(
                        vceqq_u8(d3, vdupq_n_u8(2)),
                        vorrq_u8(
                            vcgeq_u8(d2, vdupq_n_u8(6)),
                            vandq_u8(vceqq_u8(d2, vdupq_n_u8(5)), vcgeq_u8(d1, vdupq_n_u8(6))),
                        ),
                    ),
                ),
            );
            let lead_zero = vorrq_u8(
                vandq_u8(two_only, vceqzq_u8(d2)),
                vandq_u8(three, vceqzq_u8(d3)),
            );
            let bad = vorrq_u8(
                vorrq_u8(vmvnq_u8(is1), over),
                vorrq_u8(lead_zero, vandq_u8(three_plus, is4)),
            );
            // One bit per byte (NEON has no movemask).
            let bits = vandq_u8(bad, bit);
            let mask = u64::from(vaddv_u8(vget_low_u8(bits)))
                | u64::from(vaddv_u8(vget_high_u8(bits))) << 8;
            bad_at |= mask << (16 * quarter);
        }
        for g in 0..8 {
            let sel = (m >> (8 * g)) as u8;
            let packed = vtbl1_u8(
                vld1_u8(value.as_ptr().add(8 * g)),
                vld1_u8(COMPRESS[usize::from(sel)].as_ptr()),
            );
            vst1_u8(vals.as_mut_ptr().add(k), packed);
            k += sel.count_ones() as usize;
        }
    }
    (k, bad_at & m != 0)
}

pub(crate) fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        if let Ok(v) = engine.decode(s) {
            return Ok(v);
        }
    }
    Err(format!(
        "invalid base64 payload ({} characters)",
        s.chars().count()
    ))
}
