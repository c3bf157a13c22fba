//! Winograd's F(2×2, 3×3) tile transforms of the whole-map layout in NEON, four tiles of a tile
//! row at once: the same arithmetic as `crate::kernels::portable::winograd` (whose docs give
//! the layout and the matrices), in the same order, so both give the same bits.
//!
//! Why: the portable loops run along a tile row of 14–32 tiles, and with the even/odd column
//! split, the bounds checks and the scalar tails of such short rows, the transforms took a third
//! of the teacher's instructions. Here one lane is one tile: `LD2` splits 8 pixels of a row into
//! the even and odd columns of 4 tiles, and `ST2` interleaves 2 output pixels of 4 tiles.

use std::arch::aarch64::*;

/// Tiles per vector.
const L: usize = 4;

/// [`crate::kernels::portable::winograd::input_transform`], four tiles at a time.
pub(crate) fn input_transform(
    x: &[f32],
    [n, c, h, w]: [usize; 4],
    channels: std::ops::Range<usize>,
    v: &mut [&mut [f32]],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let t = n * th * tw;
    let groups = tw.div_ceil(L);
    // The plane zero-padded by 1 before, and after to whole groups: tile tx reads padded
    // columns 2tx .. 2tx+4, and a group's two LD2 loads read 8 from 2tx and 8 from 2tx + 2.
    let (ph, pw) = (2 * th + 2, 2 * L * groups + 2 + 2);
    let mut padded = vec![0f32; ph * pw];
    assert!(v.len() == 16 && v.iter().all(|vx| vx.len() >= channels.len() * t), "input_transform: short V");
    // Raw row pointers, so that the 16 stores of 4 tiles go without 16 bounds checks.
    let vp: [*mut f32; 16] = std::array::from_fn(|xi| v[xi].as_mut_ptr());
    for (b, ci) in (0..n).flat_map(|b| channels.clone().map(move |ci| (b, ci))) {
        let src = &x[(b * c + ci) * h * w..][..h * w];
        for (line, dst) in src.chunks_exact(w).zip(padded[pw..].chunks_exact_mut(pw)) {
            dst[1..=w].copy_from_slice(line);
        }
        let row_at = (ci - channels.start) * t;
        for ty in 0..th {
            let rows = &padded[2 * ty * pw..][..4 * pw];
            let t0 = row_at + (b * th + ty) * tw;
            for tx in (0..tw).step_by(L) {
                let count = L.min(tw - tx);
                // Safety: each load reads 8 values from column 2tx (+2) ≤ pw − 10 of a row of
                // `rows`, which holds 4 rows of pw; each store writes `count` values of the
                // tile row, inside v[ξ] (asserted above: t0 + tw ≤ channels·t).
                unsafe {
                    let load = |i: usize| {
                        let p = rows.as_ptr().add(i * pw + 2 * tx);
                        let (a, b) = (vld2q_f32(p), vld2q_f32(p.add(2)));
                        [a.0, a.1, b.0, b.1]
                    };
                    let (d0, d1, d2, d3) = (load(0), load(1), load(2), load(3));
                    // Bᵀ down the rows, then B along the columns, as the portable kernel.
                    let r: [[float32x4_t; 4]; 4] = [
                        std::array::from_fn(|j| vsubq_f32(d0[j], d2[j])),
                        std::array::from_fn(|j| vaddq_f32(d1[j], d2[j])),
                        std::array::from_fn(|j| vsubq_f32(d2[j], d1[j])),
                        std::array::from_fn(|j| vsubq_f32(d1[j], d3[j])),
                    ];
                    for (i, ri) in r.iter().enumerate() {
                        let out = [
                            vsubq_f32(ri[0], ri[2]),
                            vaddq_f32(ri[1], ri[2]),
                            vsubq_f32(ri[2], ri[1]),
                            vsubq_f32(ri[1], ri[3]),
                        ];
                        for (j, o) in out.into_iter().enumerate() {
                            store_first(vp[4 * i + j].add(t0 + tx), o, count);
                        }
                    }
                }
            }
        }
    }
}

/// [`crate::kernels::portable::winograd::output_transform`], four tiles at a time.
pub(crate) fn output_transform(
    m: &[f32],
    bias: &[f32],
    [n, k, h, w]: [usize; 4],
    planes: std::ops::Range<usize>,
    y: &mut [f32],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let t = n * th * tw;
    assert!(m.len() >= 16 * k * t && y.len() >= planes.len() * h * w, "output_transform: short operands");
    for (out, plane) in y.chunks_exact_mut(h * w).zip(planes) {
        let (b, ki) = (plane / k, plane % k);
        for ty in 0..th {
            let t0 = (b * th + ty) * tw;
            // Tile row t0 of M[0] for this plane; M[ξ]'s is ξ·k·t further.
            let mp = m[ki * t + t0..].as_ptr();
            for tx in (0..tw).step_by(L) {
                let count = L.min(tw - tx);
                let (x0, cols) = (2 * tx, (2 * count).min(w - 2 * tx));
                // Safety: each load reads `count` values of a tile row, inside m (asserted
                // above: (15k + ki)·t + t0 + tw ≤ 16kt); each store writes `cols` pixels of an
                // output row inside `out`.
                unsafe {
                    let mx: [float32x4_t; 16] = std::array::from_fn(|xi| load_first(mp.add(xi * k * t + tx), count));
                    let beta = vdupq_n_f32(bias[ki]);
                    for i in 0..2 {
                        let y_row = 2 * ty + i;
                        if y_row >= h {
                            break;
                        }
                        // Aᵀ down each column (row i of Aᵀ M), then A along it, plus the bias.
                        let s: [float32x4_t; 4] = std::array::from_fn(|j| {
                            let (m0, m1, m2, m3) = (mx[j], mx[4 + j], mx[8 + j], mx[12 + j]);
                            if i == 0 {
                                vaddq_f32(vaddq_f32(m0, m1), m2)
                            } else {
                                vsubq_f32(vsubq_f32(m1, m2), m3)
                            }
                        });
                        let left = vaddq_f32(vaddq_f32(vaddq_f32(s[0], s[1]), s[2]), beta);
                        let right = vaddq_f32(vsubq_f32(vsubq_f32(s[1], s[2]), s[3]), beta);
                        let dst = out[y_row * w + x0..][..cols].as_mut_ptr();
                        if cols == 2 * L {
                            vst2q_f32(dst, float32x4x2_t(left, right));
                        } else {
                            let mut px = [0f32; 2 * L];
                            vst2q_f32(px.as_mut_ptr(), float32x4x2_t(left, right));
                            // A loop of constant length: a copy of `cols` values would call memcpy.
                            for (j, &p) in px.iter().enumerate() {
                                if j < cols {
                                    *dst.add(j) = p;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The first `count` ≤ 4 lanes of `x` into `p`, lane by lane below 4: a copy of a variable
/// count would call memcpy for every 4 tiles.
///
/// Safety: `p` has room for `count` values.
#[inline(always)]
unsafe fn store_first(p: *mut f32, x: float32x4_t, count: usize) {
    unsafe {
        if count == L {
            return vst1q_f32(p, x);
        }
        if count > 0 {
            vst1q_lane_f32::<0>(p, x);
        }
        if count > 1 {
            vst1q_lane_f32::<1>(p.add(1), x);
        }
        if count > 2 {
            vst1q_lane_f32::<2>(p.add(2), x);
        }
    }
}

/// `count` ≤ 4 values from `p`, zero in the lanes above.
///
/// Safety: `p` holds `count` values.
#[inline(always)]
unsafe fn load_first(p: *const f32, count: usize) -> float32x4_t {
    unsafe {
        if count == L {
            return vld1q_f32(p);
        }
        let mut x = vdupq_n_f32(0.0);
        if count > 0 {
            x = vld1q_lane_f32::<0>(p, x);
        }
        if count > 1 {
            x = vld1q_lane_f32::<1>(p.add(1), x);
        }
        if count > 2 {
            x = vld1q_lane_f32::<2>(p.add(2), x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::portable::winograd as portable;
    use crate::kernels::testing::random;
    use std::ops::Range;

    type Input = fn(&[f32], [usize; 4], Range<usize>, &mut [&mut [f32]]);
    type Output = fn(&[f32], &[f32], [usize; 4], Range<usize>, &mut [f32]);

    /// Both transforms give the portable kernels' bits: odd and even sizes, rows of fewer
    /// tiles than a vector and of several vectors plus a tail, batches, a share of channels.
    #[test]
    fn transforms_give_the_portable_bits() {
        for [n, c, h, w] in
            [[1usize, 3, 8, 8], [2, 5, 7, 9], [1, 2, 1, 1], [3, 4, 14, 28], [1, 3, 5, 19], [2, 2, 32, 34]]
        {
            let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
            let t = n * th * tw;
            let x = random(n * c * h * w, 3);
            let channels = 1.min(c - 1)..c;
            let run = |f: Input| {
                let mut v = vec![f32::NAN; 16 * channels.len() * t];
                let mut parts: Vec<&mut [f32]> = v.chunks_mut(channels.len() * t).collect();
                f(&x, [n, c, h, w], channels.clone(), &mut parts);
                v
            };
            let (want, got) = (run(portable::input_transform), run(super::input_transform));
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "input {n} {c} {h}x{w}");

            let k = c + 1;
            let (m, bias) = (random(16 * k * t, 4), random(k, 5));
            let planes = 1..n * k;
            let run = |f: Output| {
                let mut y = vec![f32::NAN; planes.len() * h * w];
                f(&m, &bias, [n, k, h, w], planes.clone(), &mut y);
                y
            };
            let (want, got) = (run(portable::output_transform), run(super::output_transform));
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "output {n} {k} {h}x{w}");
        }
    }
}
