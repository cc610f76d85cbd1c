//! RoPE ("rotate half", transformers' form) on the fused Q/K/V projection.
//!
//! The tensor form is 7 libtorch calls for Q and 7 for K in every block (multiply, two
//! narrows, negate, concatenate, multiply, add): with one token a step, ~420 dispatches of
//! a few microseconds each on 576 floats, a noticeable share of single-stream decode. On the
//! CPU in f32 the same arithmetic runs here in one pass: `x * cos + (±x') * sin`, each product
//! and the sum rounded separately exactly as the tensor ops round them (Rust never fuses
//! them into a multiply-add), so the bits are the tensor form's (a test compares them).

use tch::{Device, Kind, Tensor};

/// Shapes of one block's projection: B rows, T tokens, heads of `hd` floats.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub b: i64,
    pub t: i64,
    pub nh: i64,
    pub nkv: i64,
    pub hd: i64,
}

/// (q, k) as [B, heads, T, hd] with RoPE applied, from `qkv` [B, T, (nh + 2 nkv) hd] and the
/// tables `cos`, `sin` [B, 1, T, hd].
pub fn rope_qk(qkv: &Tensor, cos: &Tensor, sin: &Tensor, s: Heads) -> (Tensor, Tensor) {
    // Not for tensors that carry gradients (PPO's trainable blocks): the pass is not
    // differentiable.
    let on_cpu_f32 = |x: &Tensor| {
        x.device() == Device::Cpu
            && x.kind() == Kind::Float
            && x.is_contiguous()
            && !x.requires_grad()
    };
    if on_cpu_f32(qkv) && on_cpu_f32(cos) && on_cpu_f32(sin) && s.hd % 2 == 0 {
        return rope_qk_cpu(qkv, cos, sin, s);
    }
    rope_qk_tensors(qkv, cos, sin, s)
}

/// The tensor form (any device and kind).
fn rope_qk_tensors(qkv: &Tensor, cos: &Tensor, sin: &Tensor, s: Heads) -> (Tensor, Tensor) {
    let Heads { b, t, nh, nkv, hd } = s;
    let heads = |first: i64, n: i64| {
        qkv.narrow(-1, first * hd, n * hd)
            .view([b, t, n, hd])
            .transpose(1, 2)
    };
    let rotate = |x: &Tensor| x * cos + rotate_half(x, hd / 2) * sin;
    (rotate(&heads(0, nh)), rotate(&heads(nh, nkv)))
}

fn rotate_half(x: &Tensor, half: i64) -> Tensor {
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// Reads a contiguous f32 CPU tensor.
#[allow(unsafe_code)]
fn floats(x: &Tensor) -> &[f32] {
    // SAFETY: the caller checked that x is a contiguous f32 CPU tensor; it outlives the slice
    // and nothing writes it meanwhile.
    unsafe { std::slice::from_raw_parts(x.data_ptr() as *const f32, x.numel()) }
}

fn rope_qk_cpu(qkv: &Tensor, cos: &Tensor, sin: &Tensor, s: Heads) -> (Tensor, Tensor) {
    let Heads { b, t, nh, nkv, hd } = s;
    let (rows, width, hd_u) = (
        (b * t) as usize,
        ((nh + 2 * nkv) * hd) as usize,
        hd as usize,
    );
    let (x, c, sn) = (floats(qkv), floats(cos), floats(sin));
    assert!(x.len() == rows * width && c.len() == rows * hd_u && sn.len() == rows * hd_u);
    let q = Tensor::empty([b, t, nh, hd], (Kind::Float, Device::Cpu));
    let k = Tensor::empty([b, t, nkv, hd], (Kind::Float, Device::Cpu));
    #[allow(unsafe_code)]
    // SAFETY: q and k are new contiguous f32 tensors, written only here, read after.
    let (qo, ko) = unsafe {
        (
            std::slice::from_raw_parts_mut(q.data_ptr() as *mut f32, q.numel()),
            std::slice::from_raw_parts_mut(k.data_ptr() as *mut f32, k.numel()),
        )
    };
    let (nh_u, nkv_u) = (nh as usize, nkv as usize);
    for r in 0..rows {
        let row = &x[r * width..(r + 1) * width];
        let (cr, sr) = (&c[r * hd_u..(r + 1) * hd_u], &sn[r * hd_u..(r + 1) * hd_u]);
        let qr = &mut qo[r * nh_u * hd_u..(r + 1) * nh_u * hd_u];
        for (src, dst) in row[..nh_u * hd_u]
            .chunks_exact(hd_u)
            .zip(qr.chunks_exact_mut(hd_u))
        {
            rotate_head(src, cr, sr, dst);
        }
        let kr = &mut ko[r * nkv_u * hd_u..(r + 1) * nkv_u * hd_u];
        for (src, dst) in row[nh_u * hd_u..(nh_u + nkv_u) * hd_u]
            .chunks_exact(hd_u)
            .zip(kr.chunks_exact_mut(hd_u))
        {
            rotate_head(src, cr, sr, dst);
        }
    }
    (q.transpose(1, 2), k.transpose(1, 2))
}

/// One head: out[i] = x[i] cos[i] + r[i] sin[i], r = (-x[half..], x[..half]).
#[inline]
fn rotate_head(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    let (c1, c2) = c.split_at(half);
    let (s1, s2) = s.split_at(half);
    for i in 0..half {
        o1[i] = x1[i] * c1[i] + (-x2[i]) * s1[i];
        o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(&t.contiguous().view([-1]))
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// The one-pass CPU form gives the tensor form's bits, with the same shapes, and SDPA
    /// on its output gives the same bits too (its layout is the tensor form's: [B, T, H, hd]
    /// underneath the transpose).
    #[test]
    fn the_cpu_pass_equals_the_tensor_ops_bit_for_bit() {
        tch::manual_seed(3);
        let s = Heads {
            b: 2,
            t: 5,
            nh: 9,
            nkv: 3,
            hd: 64,
        };
        let qkv = Tensor::randn([2, 5, 15 * 64], (Kind::Float, Device::Cpu)) * 3.0;
        let angles = Tensor::rand([2, 1, 5, 64], (Kind::Float, Device::Cpu)) * 40.0;
        let (cos, sin) = (angles.cos(), angles.sin());
        let (q1, k1) = rope_qk_cpu(&qkv, &cos, &sin, s);
        let (q2, k2) = rope_qk_tensors(&qkv, &cos, &sin, s);
        assert_eq!(q1.size(), q2.size());
        assert_eq!(k1.size(), k2.size());
        assert_eq!(q1.stride(), q2.stride(), "same layout as the tensor ops'");
        assert_eq!(values(&q1), values(&q2));
        assert_eq!(values(&k1), values(&k2));
        let v = qkv
            .narrow(-1, 12 * 64, 3 * 64)
            .view([2, 5, 3, 64])
            .transpose(1, 2);
        let attend = |q: &Tensor, k: &Tensor| {
            Tensor::scaled_dot_product_attention(
                q,
                k,
                &v,
                None::<&Tensor>,
                0.0,
                true,
                None::<f64>,
                true,
            )
        };
        assert_eq!(values(&attend(&q1, &k1)), values(&attend(&q2, &k2)));
        // The dispatcher takes the pass for this input, and the tensor form for one that
        // needs gradients (which then flow back to it).
        let (q3, _) = rope_qk(&qkv, &cos, &sin, s);
        assert_eq!(values(&q3), values(&q1));
        let leaf = qkv.copy().set_requires_grad(true);
        let (q4, k4) = rope_qk(&leaf, &cos, &sin, s);
        assert!(q4.requires_grad());
        (q4.sum(Kind::Float) + k4.sum(Kind::Float)).backward();
        assert!(leaf.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
