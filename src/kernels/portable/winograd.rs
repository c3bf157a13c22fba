//! Winograd's F(2×2, 3×3) transforms in the whole-map layout: the kernel transform `U = G g Gᵀ`
//! (at load, every target), and the input and output tile transforms over whole tile rows (the
//! layout run where the x86-64 blocked kernel does not apply: aarch64, and x86-64 layers too large
//! for it). The layout is described in `crate::ops::winograd3x3`.

/// `U = G g Gᵀ` for every (output, input) channel pair, stored as `[16][k][c]`.
pub(crate) fn transform_kernel(kernel: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * k * c];
    for (kc, g) in kernel.chunks_exact(9).enumerate() {
        // G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]; first G g (4×3), then (G g) Gᵀ (4×4).
        let mut gg = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            gg[0][j] = g0;
            gg[1][j] = 0.5 * (g0 + g1 + g2);
            gg[2][j] = 0.5 * (g0 - g1 + g2);
            gg[3][j] = g2;
        }
        for (i, row) in gg.iter().enumerate() {
            let [r0, r1, r2] = *row;
            let out = [r0, 0.5 * (r0 + r1 + r2), 0.5 * (r0 - r1 + r2), r2];
            for (j, v) in out.into_iter().enumerate() {
                u[(i * 4 + j) * k * c + kc] = v;
            }
        }
    }
    u
}

/// `V = Bᵀ d B` for every 4×4 input tile `d` (zero outside the image), into `v[ξ][c][t]`.
///
/// Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. Tile `tx` covers padded columns
/// `2tx .. 2tx+4`, so its columns are even, odd, even, odd columns `tx, tx, tx+1, tx+1` of the
/// padded plane: splitting the plane into its even and odd columns first turns the column
/// transform into contiguous, vectorizable loops over `tx`.
///
/// Only the channels in `channels`: `v[ξ]` holds their rows, `(ci − channels.start)·t + tile`.
#[cfg_attr(target_arch = "aarch64", allow(dead_code))] // aarch64 runs its NEON one, tested against this
pub(crate) fn input_transform(
    x: &[f32],
    [n, c, h, w]: [usize; 4],
    channels: std::ops::Range<usize>,
    v: &mut [&mut [f32]],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let t = n * th * tw;
    // Zero-padded plane, 1 pixel before and 1–2 after, as its even and odd columns.
    let (ph, cw) = (2 * th + 2, tw + 1);
    let mut even = vec![0f32; ph * cw];
    let mut odd = vec![0f32; ph * cw];
    let mut rows = vec![0f32; 8 * cw];
    for (b, ci) in (0..n).flat_map(|b| channels.clone().map(move |ci| (b, ci))) {
        let src = &x[(b * c + ci) * h * w..][..h * w];
        let row_at = (ci - channels.start) * t;
        for (i, line) in src.chunks_exact(w).enumerate() {
            // Padded column p is input column p − 1: odd columns hold the even input columns.
            // Zipped iterators over whole pairs, without bounds checks, so that the compiler
            // deinterleaves a vector of pairs at a time (LD2 on NEON).
            let (e, o) = (&mut even[(i + 1) * cw..][..cw], &mut odd[(i + 1) * cw..][..cw]);
            let pairs = line.chunks_exact(2);
            if let [last] = pairs.remainder() {
                o[w / 2] = *last;
            }
            for ((px, oj), ej) in pairs.zip(o.iter_mut()).zip(e[1..].iter_mut()) {
                *oj = px[0];
                *ej = px[1];
            }
        }
        for ty in 0..th {
            // Bᵀ down the 4 rows of this tile row, for all columns at once: rows[4·parity + i].
            for (parity, plane) in [&even, &odd].into_iter().enumerate() {
                let d = &plane[2 * ty * cw..][..4 * cw];
                let (d0, d1, d2, d3) = (&d[..cw], &d[cw..2 * cw], &d[2 * cw..3 * cw], &d[3 * cw..]);
                let out = &mut rows[4 * parity * cw..][..4 * cw];
                let (r0, rest) = out.split_at_mut(cw);
                let (r1, rest) = rest.split_at_mut(cw);
                let (r2, r3) = rest.split_at_mut(cw);
                for j in 0..cw {
                    r0[j] = d0[j] - d2[j];
                    r1[j] = d1[j] + d2[j];
                    r2[j] = d2[j] - d1[j];
                    r3[j] = d1[j] - d3[j];
                }
            }
            // Then B along the columns of each tile; tiles of the row are contiguous in `t`.
            let t0 = (b * th + ty) * tw;
            for i in 0..4 {
                let (e, o) = (&rows[i * cw..][..cw], &rows[(4 + i) * cw..][..cw]);
                let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                let at = row_at + t0;
                let v0 = &mut v[4 * i][at..][..tw];
                for tx in 0..tw {
                    v0[tx] = e0[tx] - e1[tx];
                }
                let v1 = &mut v[4 * i + 1][at..][..tw];
                for tx in 0..tw {
                    v1[tx] = o0[tx] + e1[tx];
                }
                let v2 = &mut v[4 * i + 2][at..][..tw];
                for tx in 0..tw {
                    v2[tx] = e1[tx] - o0[tx];
                }
                let v3 = &mut v[4 * i + 3][at..][..tw];
                for tx in 0..tw {
                    v3[tx] = o0[tx] - o1[tx];
                }
            }
        }
    }
}

/// `Y = Aᵀ M A + bias` for every tile, from `m[ξ][k][t]` into `y[n][k][h][w]`.
///
/// Aᵀ = [[1,1,1,0],[0,1,-1,-1]]. Only the output planes `planes` (`b·k + ki`), into `y`.
#[cfg_attr(target_arch = "aarch64", allow(dead_code))] // aarch64 runs its NEON one, tested against this
pub(crate) fn output_transform(
    m: &[f32],
    bias: &[f32],
    [n, k, h, w]: [usize; 4],
    planes: std::ops::Range<usize>,
    y: &mut [f32],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let t = n * th * tw;
    let mut s = vec![0f32; 8 * tw];
    let mut pair = vec![0f32; 2 * tw];
    for (out, plane) in y.chunks_exact_mut(h * w).zip(planes) {
        let (b, ki) = (plane / k, plane % k);
        let beta = bias[ki];
        for ty in 0..th {
            let t0 = (b * th + ty) * tw;
            let row = |xi: usize| &m[(xi * k + ki) * t + t0..][..tw];
            // Aᵀ down each column j of the tile: s[0][j] = m0j + m1j + m2j, s[1][j] = m1j − m2j − m3j.
            let (s0, s1) = s.split_at_mut(4 * tw);
            for j in 0..4 {
                let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
                let (a, b) = (&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]);
                for tx in 0..tw {
                    a[tx] = m0[tx] + m1[tx] + m2[tx];
                    b[tx] = m1[tx] - m2[tx] - m3[tx];
                }
            }
            // Then A along each row, giving 2 output rows of 2 pixels per tile.
            for i in 0..2 {
                let y_row = 2 * ty + i;
                if y_row >= h {
                    break;
                }
                let sr = &s[4 * i * tw..][..4 * tw];
                let (a0, a1, a2, a3) = (&sr[..tw], &sr[tw..2 * tw], &sr[2 * tw..3 * tw], &sr[3 * tw..]);
                for (tx, px) in pair.chunks_exact_mut(2).enumerate() {
                    px[0] = a0[tx] + a1[tx] + a2[tx] + beta;
                    px[1] = a1[tx] - a2[tx] - a3[tx] + beta;
                }
                out[y_row * w..][..w].copy_from_slice(&pair[..w]);
            }
        }
    }
}
