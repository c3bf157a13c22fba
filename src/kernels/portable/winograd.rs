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

/// The element-wise steps of the tile transforms, over rows of tiles: plain loops ([`Plain`]),
/// or an architecture's vector code where the compiler does not vectorize them (32-bit ARM,
/// `crate::kernels::arm::winograd`, whose value proves the CPU runs it). Each adds in the same
/// order, so both give the same bits.
pub(crate) trait Steps {
    /// Bᵀ along one axis: `o0 = p − r`, `o1 = q + r`, `o2 = r − q`, `o3 = q − s`, element by
    /// element over `o0.len()` values (every slice holds at least that many).
    fn bt(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], o: [&mut [f32]; 4]);
    /// Aᵀ along one axis: `o0 = p + q + r`, `o1 = q − r − s`, over `o0.len()` values.
    fn at(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], o: [&mut [f32]; 2]);
    /// Aᵀ along the other axis plus `beta`, interleaved: `out[2j] = p + q + r + beta`,
    /// `out[2j + 1] = q − r − s + beta`, for the `out.len() / 2` values of each input.
    fn at_pairs(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], beta: f32, out: &mut [f32]);
}

/// [`Steps`] as plain loops, which the compiler vectorizes where it can.
pub(crate) struct Plain;

impl Steps for Plain {
    fn bt(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], [o0, o1, o2, o3]: [&mut [f32]; 4]) {
        let n = o0.len();
        let (p, q, r, s) = (&p[..n], &q[..n], &r[..n], &s[..n]);
        let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
        for j in 0..n {
            o0[j] = p[j] - r[j];
            o1[j] = q[j] + r[j];
            o2[j] = r[j] - q[j];
            o3[j] = q[j] - s[j];
        }
    }

    fn at(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], [o0, o1]: [&mut [f32]; 2]) {
        let n = o0.len();
        let (p, q, r, s, o1) = (&p[..n], &q[..n], &r[..n], &s[..n], &mut o1[..n]);
        for j in 0..n {
            o0[j] = p[j] + q[j] + r[j];
            o1[j] = q[j] - r[j] - s[j];
        }
    }

    fn at_pairs(&self, p: &[f32], q: &[f32], r: &[f32], s: &[f32], beta: f32, out: &mut [f32]) {
        for (j, px) in out.chunks_exact_mut(2).enumerate() {
            px[0] = p[j] + q[j] + r[j] + beta;
            px[1] = q[j] - r[j] - s[j] + beta;
        }
    }
}

/// `V = Bᵀ d B` for every 4×4 input tile `d` (zero outside the image), into `v[ξ][c][t]`.
///
/// Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. Tile `tx` covers padded columns
/// `2tx .. 2tx+4`, so its columns are even, odd, even, odd columns `tx, tx, tx+1, tx+1` of the
/// padded plane: splitting the plane into its even and odd columns first turns the column
/// transform into contiguous, vectorizable loops over `tx`.
///
/// Only the channels in `channels`: `v[ξ]` holds their rows, `(ci − channels.start)·t + tile`.
#[cfg_attr(any(target_arch = "aarch64", target_arch = "arm"), allow(dead_code))] // ARM runs its NEON one, tested against this
pub(crate) fn input_transform(x: &[f32], dims: [usize; 4], channels: std::ops::Range<usize>, v: &mut [&mut [f32]]) {
    input_transform_in(&Plain, x, dims, channels, v)
}

/// [`input_transform`] with the element-wise steps of `steps`.
pub(crate) fn input_transform_in(
    steps: &impl Steps,
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
                steps.bt(d0, d1, d2, d3, [r0, r1, r2, r3]);
            }
            // Then B along the columns of each tile; tiles of the row are contiguous in `t`.
            let t0 = (b * th + ty) * tw;
            for i in 0..4 {
                let (e, o) = (&rows[i * cw..][..cw], &rows[(4 + i) * cw..][..cw]);
                let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                let at = row_at + t0;
                let [v0, v1, v2, v3] = v.get_disjoint_mut([4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]).expect("16 blocks");
                let outs = [&mut v0[at..][..tw], &mut v1[at..][..tw], &mut v2[at..][..tw], &mut v3[at..][..tw]];
                // v0 = e0 − e1, v1 = o0 + e1, v2 = e1 − o0, v3 = o0 − o1.
                steps.bt(e0, o0, e1, o1, outs);
            }
        }
    }
}

/// `Y = Aᵀ M A + bias` for every tile, from `m[ξ][k][t]` into `y[n][k][h][w]`.
///
/// Aᵀ = [[1,1,1,0],[0,1,-1,-1]]. Only the output planes `planes` (`b·k + ki`), into `y`.
#[cfg_attr(any(target_arch = "aarch64", target_arch = "arm"), allow(dead_code))] // ARM runs its NEON one, tested against this
pub(crate) fn output_transform(
    m: &[f32],
    bias: &[f32],
    dims: [usize; 4],
    planes: std::ops::Range<usize>,
    y: &mut [f32],
) {
    output_transform_in(&Plain, m, bias, dims, planes, y)
}

/// [`output_transform`] with the element-wise steps of `steps`.
pub(crate) fn output_transform_in(
    steps: &impl Steps,
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
                steps.at(m0, m1, m2, m3, [&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]]);
            }
            // Then A along each row, giving 2 output rows of 2 pixels per tile.
            for i in 0..2 {
                let y_row = 2 * ty + i;
                if y_row >= h {
                    break;
                }
                let sr = &s[4 * i * tw..][..4 * tw];
                let (a0, a1, a2, a3) = (&sr[..tw], &sr[tw..2 * tw], &sr[2 * tw..3 * tw], &sr[3 * tw..]);
                steps.at_pairs(a0, a1, a2, a3, beta, &mut pair);
                out[y_row * w..][..w].copy_from_slice(&pair[..w]);
            }
        }
    }
}
