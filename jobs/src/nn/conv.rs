//! A 2-D convolution computed as im2col + GEMMs, for speed on CPU.
//!
//! candle's CPU `conv2d` backward goes through a naive `conv_transpose2d`, several times
//! slower than the forward pass. Here the whole layer (input, weight, bias) is one fused
//! custom op, [`Conv2dOp`], computed over chunks of images whose patch matrix fits in cache
//! (about 512 KiB). With `P = OH·OW`, `K = C·k·k` and `n = P·(images in the chunk)`:
//!
//! * forward: the chunk's patches `cols` `[K, n]` (im2col), one GEMM `Y = W [Co, K] · cols`,
//!   and `Y` `[Co, n]` written out as `[b, Co, OH, OW]` with the bias added on the way;
//! * backward ([`Conv2dBackward`]): the chunk's `dY` gathered into `[Co, n]` (its row sums
//!   are the bias gradient), `dW += dY · colsᵀ`, `dcols = Wᵀ · dY`, and col2im sums `dcols`
//!   back into the chunk's input gradient.
//!
//! The patches are recomputed in the backward rather than kept from the forward: keeping
//! them (`k²` times the input, megabytes a layer) measured no faster on the ResNet and
//! slower on the ODE-Net, whose solver graph holds dozens of them: reading them back from
//! memory costs about what rebuilding them in cache does.
//!
//! How the patches are laid out depends on the geometry, so that im2col and col2im are
//! long copies rather than many short ones: a "same" convolution (stride 1, output as large
//! as the input: the 3×3 layers of the ResNet blocks and the ODE function) orders the
//! columns pixel-major, `(oy, ox, image)`, so that a patch row is one shifted copy of a
//! channel for all the chunk's images ([`im2col_same`]); a strided one (small maps: the
//! DB-VAE's encoder) gathers each patch row through a precomputed index
//! ([`im2col_strided`]); others go row by row.
//!
//! The GEMMs are the `gemm` crate's (what candle's CPU matmul calls). With several threads
//! (`RAYON_NUM_THREADS`, as candle) the chunks run in parallel on rayon's pool when there
//! are enough of them, else one by one with multi-threaded GEMMs. The scratch buffers come
//! from a small per-thread pool ([`scratch`]), which spares the page faults of fresh
//! multi-megabyte allocations. The gradients have no graph of their own (no second
//! derivatives). Off the CPU, candle's own `conv2d` is used. Parameter names and shapes
//! match `candle_nn::conv2d` (`weight` `[out, in, k, k]`, `bias` `[out]`).

use std::cell::RefCell;
use std::ops::{Add, AddAssign};
use std::thread::LocalKey;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Geometry of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) c_out: usize,
}

impl Geometry {
    pub(super) fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub(super) fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// `K = C·k·k`, the rows of the patch matrix.
    pub(super) fn cols(&self) -> usize {
        self.c * self.k * self.k
    }
    /// `P = OH·OW`, the output pixels of an image.
    pub(super) fn pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }
    pub(super) fn input_len(&self) -> usize {
        self.b * self.c * self.h * self.w
    }
    /// A "same" convolution: stride 1, output as large as the input. Its patches are
    /// pixel-major (see [`im2col_same`]).
    fn is_same(&self) -> bool {
        self.stride == 1 && self.out_h() == self.h && self.out_w() == self.w
    }
    /// For a "same" convolution (stride 1, output as large as the input), patch row `(ky,
    /// kx)` of an image is its plane shifted: `(lo, hi, s0)` such that the patch elements
    /// `lo..hi` are the plane's `s0..s0 + (hi − lo)` (the others lie in the padding, or
    /// wrap around a row edge where the column is in the padding).
    fn same_shift(&self, ky: usize, kx: usize) -> (usize, usize, usize) {
        let plane = (self.h * self.w) as isize;
        let shift = (ky * self.w + kx) as isize - (self.pad * self.w + self.pad) as isize;
        let lo = (-shift).clamp(0, plane);
        let hi = (plane - shift).clamp(lo, plane);
        (lo as usize, hi as usize, (lo + shift) as usize)
    }
    /// The outputs `o` (of `len`) whose input `o·stride + offset − pad` lies in `[0, size)`.
    fn valid(&self, len: usize, offset: usize, size: usize) -> std::ops::Range<usize> {
        let s = self.stride;
        // o·s + offset ≥ pad  ⇔  o ≥ ceil((pad − offset) / s)
        let lo = self.pad.saturating_sub(offset).div_ceil(s);
        // o·s + offset − pad < size  ⇔  o < ceil((size + pad − offset) / s)
        let hi = (size + self.pad)
            .saturating_sub(offset)
            .div_ceil(s)
            .min(len);
        lo.min(hi)..hi
    }
}

/// Threads of the im2col/col2im loops and the GEMMs: `RAYON_NUM_THREADS` when set (the
/// variable candle's CPU GEMM and rayon follow, so one setting bounds a rank's threads),
/// else every CPU.
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// The patch matrix of a chunk of images is kept near this many elements (about 512 KiB
/// of f32, so that it is still in the core's cache when the GEMM reads it back; larger
/// chunks than that of 256 KiB measured a few percent faster, fewer GEMM calls packing the
/// weight again).
const CHUNK_ELEMS: usize = 1 << 17;

/// What the kernels need of an element type (f32, f64), with its scratch-buffer pool.
pub(super) trait Elem:
    Copy + Default + Send + Sync + Add<Output = Self> + AddAssign + 'static
{
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
}

thread_local! {
    static POOL_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static POOL_F64: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
}

impl Elem for f32 {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        &POOL_F32
    }
}

impl Elem for f64 {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        &POOL_F64
    }
}

/// Scratch buffers kept per thread between calls: the patch matrices are megabytes, and a
/// fresh allocation of that size costs page faults (the kernel zeroing new pages) every
/// time. At most this many are kept.
const POOL_KEEP: usize = 4;

/// A scratch vector of `len` from this thread's pool (or a new one), NOT cleared: it may
/// hold a previous user's values, so every element must be written before it is read.
fn scratch<T: Elem>(len: usize) -> Vec<T> {
    let mut v = T::pool()
        .with(|p| {
            let mut p = p.borrow_mut();
            // the smallest buffer that fits, else the largest (it grows)
            let fit = (0..p.len())
                .filter(|&i| p[i].capacity() >= len)
                .min_by_key(|&i| p[i].capacity())
                .or_else(|| (0..p.len()).max_by_key(|&i| p[i].capacity()));
            fit.map(|i| p.swap_remove(i))
        })
        .unwrap_or_default();
    // zeroes only what grows beyond the previous length
    v.resize(len, T::default());
    v
}

/// Returns a scratch vector to this thread's pool.
fn recycle<T: Elem>(v: Vec<T>) {
    T::pool().with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_KEEP {
            p.push(v);
        }
    });
}

/// The patch matrix `[K, nb·P]` of images `b0..b0 + nb` of `x` `[B, C, H, W]` into `out`
/// (every element written, so `out` need not be zeroed): row `(c, ky, kx)`, column
/// `(b − b0, oy, ox)`. Strides above 1 go to [`im2col_strided`]; "same" convolutions use
/// [`im2col_same`] instead.
fn im2col<T: Elem>(x: &[T], g: Geometry, b0: usize, nb: usize, out: &mut [T]) {
    if g.stride > 1 {
        return im2col_strided(x, g, b0, nb, out);
    }
    let (oh, ow, p) = (g.out_h(), g.out_w(), g.pixels());
    let n = nb * p;
    let kk = g.k * g.k;
    let plane = g.h * g.w;
    let zero = T::default();
    for (row, dst) in out[..g.cols() * n].chunks_mut(n.max(1)).enumerate() {
        let (c, ky, kx) = (row / kk, (row % kk) / g.k, row % g.k);
        let oys = g.valid(oh, ky, g.h);
        let oxs = g.valid(ow, kx, g.w);
        if oxs.is_empty() || oys.is_empty() {
            dst.fill(zero);
            continue;
        }
        for (i, d) in dst.chunks_mut(p).enumerate() {
            let src = &x[((b0 + i) * g.c + c) * plane..][..plane];
            d[..oys.start * ow].fill(zero);
            d[oys.end * ow..].fill(zero);
            let ix0 = oxs.start * g.stride + kx - g.pad;
            for oy in oys.clone() {
                let iy = oy * g.stride + ky - g.pad;
                let src_row = &src[iy * g.w + ix0..(iy + 1) * g.w];
                let d = &mut d[oy * ow..][..ow];
                d[..oxs.start].fill(zero);
                d[oxs.end..].fill(zero);
                let d = &mut d[oxs.clone()];
                d.copy_from_slice(&src_row[..d.len()]);
            }
        }
    }
}

/// The adjoint of [`im2col`]: sums the patch matrix `[K, nb·P]` of `nb` images back into
/// their `out` `[nb, C, H, W]` (zeroed). `cols` is scratch (the strided path reads it
/// only, the others may clear its padding columns).
fn col2im<T: Elem>(cols: &mut [T], g: Geometry, nb: usize, out: &mut [T]) {
    if g.stride > 1 {
        return col2im_strided(cols, g, nb, out);
    }
    let (oh, ow, p) = (g.out_h(), g.out_w(), g.pixels());
    let n = nb * p;
    let kk = g.k * g.k;
    let plane = g.h * g.w;
    let per = g.c * plane;
    for (row, src) in cols[..g.cols() * n].chunks_mut(n.max(1)).enumerate() {
        let (c, ky, kx) = (row / kk, (row % kk) / g.k, row % g.k);
        let oys = g.valid(oh, ky, g.h);
        let oxs = g.valid(ow, kx, g.w);
        if oxs.is_empty() || oys.is_empty() {
            continue;
        }
        for (i, s) in src.chunks_mut(p).enumerate().take(nb) {
            let dst = &mut out[i * per + c * plane..][..plane];
            let ix0 = oxs.start * g.stride + kx - g.pad;
            for oy in oys.clone() {
                let iy = oy * g.stride + ky - g.pad;
                let dst_row = &mut dst[iy * g.w + ix0..(iy + 1) * g.w];
                let s = &s[oy * ow..][..ow][oxs.clone()];
                for (d, s) in dst_row.iter_mut().zip(s) {
                    *d += *s;
                }
            }
        }
    }
}

/// The chunk `x` `[nb, C, P]` (images `b0..b0 + nb` of `x`) pixel-major, as `[C, P, nb]`
/// into `out`.
fn to_pixel_major<T: Elem>(x: &[T], (c, p): (usize, usize), b0: usize, nb: usize, out: &mut [T]) {
    for (ch, dst) in out[..c * p * nb].chunks_exact_mut(p * nb).enumerate() {
        for i in 0..nb {
            let src = &x[((b0 + i) * c + ch) * p..][..p];
            for (d, s) in dst[i..].iter_mut().step_by(nb).zip(src) {
                *d = *s;
            }
        }
    }
}

/// The inverse of [`to_pixel_major`]: `xt` `[C, P, nb]` into `out` `[nb, C, P]`.
fn from_pixel_major<T: Elem>(xt: &[T], (c, p): (usize, usize), nb: usize, out: &mut [T]) {
    for (ch, src) in xt[..c * p * nb].chunks_exact(p * nb).enumerate() {
        for i in 0..nb {
            let dst = &mut out[(i * c + ch) * p..][..p];
            for (d, s) in dst.iter_mut().zip(src[i..].iter().step_by(nb)) {
                *d = *s;
            }
        }
    }
}

/// The patch matrix `[K, P·nb]` of a "same" convolution from the chunk's pixel-major input
/// `xt` `[C, P, nb]` (see [`to_pixel_major`]), every element written: row `(c, ky, kx)`,
/// column `(oy, ox, image)`, pixel-major so that a row is channel `c`'s pixel-major plane
/// shifted by a constant (all the chunk's images at once): one copy, then the columns
/// whose input lies in the padding cleared. (Image-major patches would take a copy per
/// image and row, which at the models' 6×6 planes costs more than the copying itself.)
fn im2col_same<T: Elem>(xt: &[T], g: Geometry, nb: usize, out: &mut [T]) {
    let (w, p) = (g.w, g.pixels());
    let n = nb * p;
    let kk = g.k * g.k;
    let zero = T::default();
    for (row, d) in out[..g.cols() * n].chunks_mut(n.max(1)).enumerate() {
        let (c, ky, kx) = (row / kk, (row % kk) / g.k, row % g.k);
        let (oys, oxs) = (g.valid(g.h, ky, g.h), g.valid(w, kx, g.w));
        if oys.is_empty() || oxs.is_empty() {
            d.fill(zero);
            continue;
        }
        let (lo, hi, s0) = g.same_shift(ky, kx);
        let src = &xt[c * n..][..n];
        d[..lo * nb].fill(zero);
        d[lo * nb..hi * nb].copy_from_slice(&src[s0 * nb..(s0 + hi - lo) * nb]);
        d[hi * nb..].fill(zero);
        if oxs.start > 0 || oxs.end < w {
            // the columns in the padding wrapped onto the neighbouring image rows
            clear_columns(d, w * nb, oxs.start * nb..oxs.end * nb);
        }
    }
}

/// The adjoint of [`im2col_same`]: sums the pixel-major patch matrix `[K, P·nb]` into the
/// chunk's pixel-major `dxt` `[C, P, nb]` (zeroed). `cols` is scratch: its padding columns
/// are cleared on the way.
fn col2im_same<T: Elem>(cols: &mut [T], g: Geometry, nb: usize, dxt: &mut [T]) {
    let (w, p) = (g.w, g.pixels());
    let n = nb * p;
    let kk = g.k * g.k;
    for (row, s) in cols[..g.cols() * n].chunks_mut(n.max(1)).enumerate() {
        let (c, ky, kx) = (row / kk, (row % kk) / g.k, row % g.k);
        let (oys, oxs) = (g.valid(g.h, ky, g.h), g.valid(w, kx, g.w));
        if oys.is_empty() || oxs.is_empty() {
            continue;
        }
        if oxs.start > 0 || oxs.end < w {
            clear_columns(s, w * nb, oxs.start * nb..oxs.end * nb);
        }
        let (lo, hi, s0) = g.same_shift(ky, kx);
        let dst = &mut dxt[c * n + s0 * nb..][..(hi - lo) * nb];
        for (d, s) in dst.iter_mut().zip(&s[lo * nb..hi * nb]) {
            *d += *s;
        }
    }
}

/// `Σ x`, in 8 independent partial sums (vectorizable, not bound by the latency of one
/// chain of additions).
fn sum<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::default(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    let mut total = T::default();
    for v in chunks.remainder().iter().chain(&acc) {
        total += *v;
    }
    total
}

/// Clears, in each row of `ow` of `d`, the columns outside `keep`.
fn clear_columns<T: Elem>(d: &mut [T], ow: usize, keep: std::ops::Range<usize>) {
    for r in d.chunks_exact_mut(ow) {
        for v in &mut r[..keep.start] {
            *v = T::default();
        }
        for v in &mut r[keep.end..] {
            *v = T::default();
        }
    }
}

/// For strides above 1: for every tap `r = (ky, kx)` and output pixel `o = (oy, ox)`, at
/// `r · P + o`, the index in the input plane of the pixel the patch reads, or `plane` (one
/// past the end: a zero slot) where it reads padding.
fn strided_taps(g: Geometry) -> Vec<u32> {
    let (oh, ow, plane) = (g.out_h(), g.out_w(), g.h * g.w);
    let mut idx = Vec::with_capacity(g.k * g.k * oh * ow);
    for ky in 0..g.k {
        for kx in 0..g.k {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (iy, ix) = (oy * g.stride + ky, ox * g.stride + kx);
                    let inside = iy >= g.pad && ix >= g.pad && iy - g.pad < g.h && ix - g.pad < g.w;
                    idx.push(if inside {
                        ((iy - g.pad) * g.w + ix - g.pad) as u32
                    } else {
                        plane as u32
                    });
                }
            }
        }
    }
    idx
}

/// [`im2col`] for strides above 1: each image-channel plane is copied once into a buffer
/// with a zero slot after it, then every tap's row of the patch matrix is one gather
/// through [`strided_taps`] (feature maps here are small: a row-by-row copy spent more on
/// its per-row bookkeeping than on copying).
fn im2col_strided<T: Elem>(x: &[T], g: Geometry, b0: usize, nb: usize, out: &mut [T]) {
    let (p, kk) = (g.pixels(), g.k * g.k);
    let n = nb * p;
    let plane = g.h * g.w;
    let idx = strided_taps(g);
    let mut padded = scratch::<T>(plane + 1);
    padded[plane] = T::default();
    for i in 0..nb {
        for c in 0..g.c {
            padded[..plane].copy_from_slice(&x[((b0 + i) * g.c + c) * plane..][..plane]);
            for (r, taps) in idx.chunks_exact(p).enumerate() {
                let d = &mut out[(c * kk + r) * n + i * p..][..p];
                for (d, &ix) in d.iter_mut().zip(taps) {
                    *d = padded[ix as usize];
                }
            }
        }
    }
    recycle(padded);
}

/// [`col2im`] for strides above 1: the adjoint of [`im2col_strided`], each image-channel's
/// patch rows scattered (added, tap by tap) into a plane with a zero slot, then added to
/// `out`.
fn col2im_strided<T: Elem>(cols: &[T], g: Geometry, nb: usize, out: &mut [T]) {
    let (p, kk) = (g.pixels(), g.k * g.k);
    let n = nb * p;
    let plane = g.h * g.w;
    let idx = strided_taps(g);
    let mut acc = scratch::<T>(plane + 1);
    for i in 0..nb {
        for c in 0..g.c {
            acc.fill(T::default());
            for (r, taps) in idx.chunks_exact(p).enumerate() {
                let src = &cols[(c * kk + r) * n + i * p..][..p];
                for (v, &ix) in src.iter().zip(taps) {
                    acc[ix as usize] += *v;
                }
            }
            let dst = &mut out[(i * g.c + c) * plane..][..plane];
            for (d, v) in dst.iter_mut().zip(&acc[..plane]) {
                *d += *v;
            }
        }
    }
    recycle(acc);
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]` with the given (row, column) strides of the
/// operands; `dst` is row-major; `accumulate` adds to it instead of overwriting.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Elem>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    one: T,
    threads: usize,
) {
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::default());
        }
        return;
    }
    // the last elements the strides reach lie inside the slices
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let parallelism = if threads > 1 && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element the strides address inside the slices,
    // `dst` is exclusively borrowed, and T is f32 or f64 (the types `gemm` supports).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            one,
            one,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Images per chunk: the patch matrix of a chunk stays near [`CHUNK_ELEMS`]; with several
/// threads, also at most `B / 2t` (rounded up), so that there are chunks enough to run in
/// parallel (see [`plan`]) where the batch allows.
fn chunk_images(g: Geometry) -> usize {
    let by_cache = (CHUNK_ELEMS / (g.cols() * g.pixels()).max(1)).clamp(1, g.b.max(1));
    match threads() {
        t if t > 1 => by_cache.min(g.b.div_ceil(2 * t)).max(1),
        _ => by_cache,
    }
}

/// How chunks are run: one after the other with multi-threaded GEMMs (`threads` for the
/// GEMMs), or in parallel on rayon's pool, each single-threaded (when there are enough).
fn plan(g: Geometry) -> (usize, bool) {
    let t = threads();
    let chunks = g.b.div_ceil(chunk_images(g));
    if t > 1 && chunks >= 2 * t {
        (1, true)
    } else {
        (t, false)
    }
}

/// Forward pass: `[B, Co, OH, OW]` from `x`, `weight` `[Co, K]` and `bias` `[Co]`, in
/// chunks of images: im2col of the chunk, one GEMM, written out with the bias.
pub(super) fn conv_forward<T: Elem>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    g: Geometry,
    one: T,
) -> Vec<T> {
    let (co, kc, p) = (g.c_out, g.cols(), g.pixels());
    let per_out = co * p;
    let ci = chunk_images(g);
    let (gemm_threads, parallel) = plan(g);
    let mut out = vec![T::default(); g.b * per_out];
    let same = g.is_same();
    let run = |c: usize, dst: &mut [T]| {
        let (b0, nb) = (c * ci, dst.len() / per_out.max(1));
        let n = nb * p;
        let mut cols = scratch(kc * n);
        if same {
            let mut xt = scratch(g.c * n);
            to_pixel_major(x, (g.c, p), b0, nb, &mut xt);
            im2col_same(&xt, g, nb, &mut cols);
            recycle(xt);
        } else {
            im2col(x, g, b0, nb, &mut cols);
        }
        let mut y = scratch(co * n);
        matmul(
            &mut y,
            (co, n, kc),
            weight,
            (kc, 1),
            &cols,
            (n, 1),
            false,
            one,
            gemm_threads,
        );
        // Y [Co, n] (columns image-major, or pixel-major when `same`) into [nb, Co, P]
        for (i, img) in dst.chunks_mut(per_out).enumerate() {
            for (o, d) in img.chunks_mut(p).enumerate() {
                let bo = bias[o];
                if same {
                    for (d, s) in d.iter_mut().zip(y[o * n + i..].iter().step_by(nb)) {
                        *d = *s + bo;
                    }
                } else {
                    for (d, s) in d.iter_mut().zip(&y[o * n + i * p..][..p]) {
                        *d = *s + bo;
                    }
                }
            }
        }
        recycle(cols);
        recycle(y);
    };
    if per_out == 0 {
        return out;
    }
    if parallel {
        use rayon::prelude::*;
        out.par_chunks_mut(ci * per_out)
            .enumerate()
            .for_each(|(c, dst)| run(c, dst));
    } else {
        for (c, dst) in out.chunks_mut(ci * per_out).enumerate() {
            run(c, dst);
        }
    }
    out
}

/// Which gradients [`conv_backward`] computes (the others stay zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wanted {
    /// The input gradient `dx`.
    pub(super) input: bool,
    /// The weight gradient `dW` (needs `x`; `x` is not read otherwise).
    pub(super) weight: bool,
}

/// Backward pass: `[dx (B·C·H·W) | dW (Co·K) | db (Co)]` from `x`, `weight` and `dy`, in
/// chunks of images: the chunk's `dY` as `[Co, nb·P]`, its row sums into `db`, `dW +=
/// dY · colsᵀ`, `dcols = Wᵀ · dY`, col2im into the chunk's `dx`. `want` skips the GEMMs
/// of a gradient nobody needs.
pub(super) fn conv_backward<T: Elem>(
    x: &[T],
    weight: &[T],
    dy: &[T],
    g: Geometry,
    one: T,
    want: Wanted,
) -> Vec<T> {
    let (co, kc, p) = (g.c_out, g.cols(), g.pixels());
    let per_in = g.c * g.h * g.w;
    let ci = chunk_images(g);
    let (gemm_threads, parallel) = plan(g);
    let mut out = vec![T::default(); g.input_len() + co * kc + co];
    let (dx, rest) = out.split_at_mut(g.input_len());
    let same = g.is_same();
    // one chunk: its dx into `dst`, its dW and db added to `dw_db` ([Co·K | Co])
    let run = |c: usize, dst: &mut [T], dw_db: &mut [T]| {
        let b0 = c * ci;
        let nb = (g.b - b0).min(ci);
        let n = nb * p;
        // dY [Co, n], its columns ordered as the patches' (pixel-major when `same`)
        let mut dyt = scratch(co * n);
        for (o, row) in dyt.chunks_mut(n).enumerate() {
            for i in 0..nb {
                let src = &dy[((b0 + i) * co + o) * p..][..p];
                if same {
                    for (d, s) in row[i..].iter_mut().step_by(nb).zip(src) {
                        *d = *s;
                    }
                } else {
                    row[i * p..(i + 1) * p].copy_from_slice(src);
                }
            }
        }
        let (dw, db) = dw_db.split_at_mut(co * kc);
        for (d, row) in db.iter_mut().zip(dyt.chunks(n)) {
            *d += sum(row);
        }
        let mut cols = scratch(kc * n);
        if want.weight {
            if same {
                let mut xt = scratch(g.c * n);
                to_pixel_major(x, (g.c, p), b0, nb, &mut xt);
                im2col_same(&xt, g, nb, &mut cols);
                recycle(xt);
            } else {
                im2col(x, g, b0, nb, &mut cols);
            }
            // dW [Co, K] += dY [Co, n] · colsᵀ [n, K]
            matmul(
                dw,
                (co, kc, n),
                &dyt,
                (n, 1),
                &cols,
                (1, n),
                true,
                one,
                gemm_threads,
            );
        }
        if want.input {
            // dcols [K, n] = Wᵀ [K, Co] · dY [Co, n], in the patches' buffer
            let (wt, dyr) = ((1, kc), (n, 1));
            matmul(
                &mut cols,
                (kc, n, co),
                weight,
                wt,
                &dyt,
                dyr,
                false,
                one,
                gemm_threads,
            );
            if same {
                let mut dxt = scratch(g.c * n);
                dxt.fill(T::default());
                col2im_same(&mut cols, g, nb, &mut dxt);
                from_pixel_major(&dxt, (g.c, p), nb, dst);
                recycle(dxt);
            } else {
                col2im(&mut cols, g, nb, dst);
            }
        }
        recycle(cols);
        recycle(dyt);
    };
    if per_in == 0 || g.b == 0 {
        return out;
    }
    if parallel {
        use rayon::prelude::*;
        let partial = dx
            .par_chunks_mut(ci * per_in)
            .enumerate()
            .fold(
                || vec![T::default(); co * kc + co],
                |mut acc, (c, dst)| {
                    run(c, dst, &mut acc);
                    acc
                },
            )
            .reduce_with(|mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
                a
            });
        if let Some(sum) = partial {
            rest.copy_from_slice(&sum);
        }
    } else {
        for (c, dst) in dx.chunks_mut(ci * per_in).enumerate() {
            run(c, dst, rest);
        }
    }
    out
}

/// The fused convolution `(x [B, C, H, W], weight [Co, C, k, k], bias [Co]) → [B, Co, OH,
/// OW]` on the CPU; its backward is [`Conv2dBackward`].
#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    geometry: Geometry,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "trainyard-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let shape = Shape::from((g.b, g.c_out, g.out_h(), g.out_w()));
        let out = super::dispatch3(
            self.name(),
            ["input", "weight", "bias"],
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| conv_forward(x, w, b, g, 1.0),
            |x, w, b| conv_forward(x, w, b, g, 1.0),
        )?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry;
        // The first layer's input (the images) needs no gradient: skip its GEMM and col2im.
        let want = Wanted {
            input: x.track_op(),
            weight: weight.track_op(),
        };
        let all = x.apply_op3_no_bwd(
            weight,
            &grad_res.contiguous()?,
            &Conv2dBackward { geometry: g, want },
        )?;
        super::split_grads(
            &all,
            (g.b, g.c, g.h, g.w),
            (g.c_out, g.c, g.k, g.k),
            g.c_out,
            want,
        )
    }
}

/// The gradients of [`Conv2dOp`], `(x, weight, dy) → [dx | dW | db]` flattened into one
/// vector. Has no backward of its own (no second derivatives).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dBackward {
    geometry: Geometry,
    want: Wanted,
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "trainyard-conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let shape = Shape::from(g.input_len() + g.c_out * g.cols() + g.c_out);
        let want = self.want;
        let out = super::dispatch3(
            self.name(),
            ["input", "weight", "output gradient"],
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, dy| conv_backward(x, w, dy, g, 1.0, want),
            |x, w, dy| conv_backward(x, w, dy, g, 1.0, want),
        )?;
        Ok((out, shape))
    }
}

/// A square 2-D convolution layer (im2col + GEMM on CPU, see the module docs).
#[derive(Debug, Clone)]
pub struct GemmConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl GemmConv2d {
    /// Creates `weight` `[c_out, c_in, k, k]` (and `bias` `[c_out]` if `bias`) under `vb`,
    /// with candle_nn's default initialisation.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if stride == 0 || k == 0 {
            candle_core::bail!("conv: kernel and stride must be at least 1");
        }
        let weight = vb.get_with_hints(
            (c_out, c_in, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
            Some(vb.get_with_hints(
                c_out,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// The weight tensor.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for GemmConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, k, _) = self.weight.dims4()?;
        if !x.device().is_cpu() {
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
                None => Ok(y),
            };
        }
        let (b, c, h, w) = x.dims4()?;
        if c != c_in {
            candle_core::bail!("conv: input has {c} channels, the layer expects {c_in}");
        }
        if h + 2 * self.padding < k || w + 2 * self.padding < k {
            candle_core::bail!("conv: input {h}x{w} is smaller than the kernel {k}");
        }
        if !matches!(x.dtype(), DType::F32 | DType::F64) {
            candle_core::bail!("conv: unsupported dtype {:?}", x.dtype());
        }
        let geometry = Geometry {
            b,
            c,
            h,
            w,
            k,
            stride: self.stride,
            pad: self.padding,
            c_out,
        };
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(c_out, x.dtype(), x.device())?,
        };
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &bias.contiguous()?,
            Conv2dOp { geometry },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let d = Device::Cpu;
        for (c_in, c_out, h, k, stride, pad) in [
            (3, 4, 7, 3, 1, 1),
            (2, 3, 9, 4, 2, 1),
            (1, 2, 6, 3, 1, 0),
            (2, 2, 5, 3, 2, 0),
            (3, 5, 4, 5, 2, 2),
            (2, 3, 3, 3, 3, 2),
            (4, 2, 8, 1, 1, 0),
            (2, 3, 6, 5, 1, 2),
            (2, 2, 4, 5, 1, 2),
        ] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F64, &d);
            let conv = GemmConv2d::new(c_in, c_out, k, stride, pad, true, vb).unwrap();
            let x =
                Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, c_in, h, h), &d).unwrap()).unwrap();
            let ours = conv.forward(x.as_tensor()).unwrap();
            let bias = conv
                .bias
                .as_ref()
                .unwrap()
                .reshape((1, c_out, 1, 1))
                .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(&conv.weight, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(crate::nn::max_abs_diff(&ours, &theirs) < 1e-10);
            // gradients w.r.t. input, weight and bias agree for a random cotangent
            let r = Tensor::randn(0f64, 1.0, ours.dims(), &d).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for t in [x.as_tensor(), &conv.weight, conv.bias.as_ref().unwrap()] {
                let diff = crate::nn::max_abs_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(diff < 1e-9, "{c_in} {c_out} {h} {k} {stride} {pad}: {diff}");
            }
        }
    }

    /// The job-sized f32 layers (batch 32, the MNIST stem and blocks, the DB-VAE encoder),
    /// on several threads, no bias and bias: forward and all three gradients agree with
    /// candle's conv2d up to f32 rounding.
    #[test]
    fn matches_candle_conv2d_in_f32_at_job_sizes() {
        let d = Device::Cpu;
        for (c_in, c_out, h, k, stride, pad, bias) in [
            (1, 32, 28, 3, 1, 0, true),
            (32, 32, 26, 4, 2, 1, true),
            (33, 32, 6, 3, 1, 1, false),
            (12, 24, 14, 5, 2, 2, true),
        ] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &d);
            let conv = GemmConv2d::new(c_in, c_out, k, stride, pad, bias, vb).unwrap();
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (32, c_in, h, h), &d).unwrap()).unwrap();
            let ours = conv.forward(x.as_tensor()).unwrap();
            let mut theirs = x
                .as_tensor()
                .conv2d(&conv.weight, pad, stride, 1, 1)
                .unwrap();
            if let Some(b) = &conv.bias {
                theirs = theirs
                    .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
                    .unwrap();
            }
            let scale = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    .max(1.0)
            };
            let rel = |a: &Tensor, b: &Tensor| {
                crate::nn::max_abs_diff(
                    &a.to_dtype(DType::F64).unwrap(),
                    &b.to_dtype(DType::F64).unwrap(),
                ) / scale(b)
            };
            assert_eq!(ours.dims(), theirs.dims());
            assert!(rel(&ours, &theirs) < 1e-5);
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &d).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut params = vec![x.as_tensor(), &conv.weight];
            params.extend(conv.bias.as_ref());
            for t in params {
                let e = rel(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(e < 1e-4, "{c_in} {c_out} {h} {k} {stride} {pad}: {e}");
            }
        }
    }

    /// With an input that needs no gradient (the backward skips `dx`), the weight and
    /// bias gradients still agree with candle's, for a "same", a strided and another
    /// geometry; and the pixel-major layout round-trips.
    #[test]
    fn an_untracked_input_still_gets_exact_weight_gradients() {
        let d = Device::Cpu;
        for (c_in, c_out, h, k, stride, pad) in
            [(3, 4, 7, 3, 1, 1), (2, 3, 9, 4, 2, 1), (2, 3, 6, 3, 1, 0)]
        {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F64, &d);
            let conv = GemmConv2d::new(c_in, c_out, k, stride, pad, true, vb).unwrap();
            let x = Tensor::randn(0f64, 1.0, (5, c_in, h, h), &d).unwrap();
            let ours = conv.forward(&x).unwrap();
            let bias = conv.bias.as_ref().unwrap();
            let theirs = x
                .conv2d(&conv.weight, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            let r = Tensor::randn(0f64, 1.0, ours.dims(), &d).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(g1.get(&x).is_none());
            for t in [&conv.weight, bias] {
                let diff = crate::nn::max_abs_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(diff < 1e-9, "{c_in} {c_out} {h} {k} {stride} {pad}: {diff}");
            }
        }
        // 10 images of 3 channels of 4 pixels; images 2..7 pixel-major and back
        let x: Vec<f64> = (0..10 * 3 * 4).map(|v| v as f64).collect();
        let (mut xt, mut back) = (vec![0.0; 60], vec![0.0; 60]);
        to_pixel_major(&x, (3, 4), 2, 5, &mut xt);
        from_pixel_major(&xt, (3, 4), 5, &mut back);
        assert_eq!(back, x[24..84]);
        // channel 1, pixel 2 of the chunk's image 3
        assert_eq!(xt[(4 + 2) * 5 + 3], x[((2 + 3) * 3 + 1) * 4 + 2]);
    }

    #[test]
    fn valid_ranges_keep_inputs_inside_the_image() {
        let g = Geometry {
            b: 1,
            c: 1,
            h: 5,
            w: 5,
            k: 4,
            stride: 2,
            pad: 1,
            c_out: 1,
        };
        for offset in 0..g.k {
            let r = g.valid(g.out_w(), offset, g.w);
            for o in 0..g.out_w() {
                let i = (o * g.stride + offset) as isize - g.pad as isize;
                assert_eq!(
                    r.contains(&o),
                    (0..g.w as isize).contains(&i),
                    "{offset} {o}"
                );
            }
        }
    }
}
