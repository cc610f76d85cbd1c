//! Adam as libtorch's `torch::optim::Adam` computes it (L2 weight decay added to the gradient,
//! no AMSGrad), fused on the CPU.
//!
//! libtorch's step is nine tensor operations per parameter (add, mul_, add_, mul_, addcmul_,
//! sqrt, div, add_, addcdiv_), each a full pass over up to 0.26M floats: a fifth of a DDQN
//! gradient step. This does the same arithmetic, rounding for rounding, in two passes around
//! ATen's own sqrt: fused multiply-adds where ATen's vector kernels fuse (`add` with alpha,
//! `addcmul`) on its AVX2 and AVX-512 paths, separate roundings on its baseline path and where
//! it never fuses, IEEE division: the result equals libtorch's bit for bit on each x86 kernel
//! path (unit test below; the DDQN test that pins a run's output covers it end to end). Other
//! devices and CPUs keep libtorch's optimiser.
use tch::{Device, Kind, Tensor};

/// First- and second-moment decay, and the denominator's epsilon (tch's `nn::Adam` defaults).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One parameter and its moment estimates.
struct Slot {
    param: Tensor,
    exp_avg: Vec<f32>,
    /// A tensor, for ATen's sqrt (see [`update`]).
    exp_avg_sq: Tensor,
    /// That sqrt's output, reused every step.
    sqrt: Tensor,
}

pub struct FusedAdam {
    slots: Vec<Slot>,
    lr: f64,
    weight_decay: f64,
    step: i32,
    /// Whether ATen's kernels fuse their multiply-adds on this kernel path (x86 AVX2 and
    /// AVX-512 builds do; the baseline build, `ATEN_CPU_CAPABILITY=default`, rounds twice).
    fused: bool,
}

impl FusedAdam {
    /// An optimiser for `params` (CPU, f32, contiguous: as a `VarStore` creates them), or None
    /// off x86-64, where ATen's rounding is not known here and libtorch's optimiser stays.
    pub fn for_this_cpu(
        params: Vec<Tensor>,
        lr: f64,
        weight_decay: f64,
    ) -> Option<Result<FusedAdam, String>> {
        let fused = match flag_core::numerics::cpu_capability().as_str() {
            "avx2" | "avx512" => true,
            "default" => false,
            _ => return None,
        };
        Some(FusedAdam::new(params, lr, weight_decay, fused))
    }

    fn new(
        params: Vec<Tensor>,
        lr: f64,
        weight_decay: f64,
        fused: bool,
    ) -> Result<FusedAdam, String> {
        let slots = params
            .into_iter()
            .map(|param| {
                if param.device() != Device::Cpu
                    || param.kind() != Kind::Float
                    || !param.is_contiguous()
                {
                    return Err(format!(
                        "fused Adam takes contiguous f32 CPU parameters, not {:?} {:?}",
                        param.kind(),
                        param.device()
                    ));
                }
                let n = param.numel();
                let zeros = || Tensor::zeros([n as i64], (Kind::Float, Device::Cpu));
                Ok(Slot {
                    param,
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: zeros(),
                    sqrt: zeros(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FusedAdam {
            slots,
            lr,
            weight_decay,
            step: 0,
            fused,
        })
    }

    /// Zeroes every gradient. libtorch's `zero_grad` drops them and backward then stores a
    /// fresh one; accumulating into zeros gives the same values, except that an exact -0.0
    /// gradient entry becomes +0.0 (tch cannot drop a gradient). That sign is lost at once:
    /// the step first adds `weight_decay * p`, and x + 0.0 = x + (-0.0) for any x but zero, so
    /// it could only show for a parameter that is exactly 0.0 (the pinned run is unchanged).
    pub fn zero_grad(&self) {
        for s in &self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Scales the gradients so that their joint L2 norm is at most `max`, computed as tch's
    /// `Optimizer::clip_grad_norm` does (per-tensor norms, then the norm of those).
    pub fn clip_grad_norm(&self, max: f64) {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self
                .slots
                .iter()
                .map(|s| s.param.grad())
                .filter(Tensor::defined)
                .map(|g| g.norm())
                .collect();
            if norms.is_empty() {
                return;
            }
            let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
            let coef = max / (total + 1e-6);
            if coef < 1.0 {
                for s in &self.slots {
                    let mut g = s.param.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            }
        })
    }

    /// One Adam step on every parameter that has a gradient.
    pub fn step(&mut self) {
        self.step += 1;
        let bias_correction1 = 1.0 - BETA1.powf(f64::from(self.step));
        let bias_correction2 = 1.0 - BETA2.powf(f64::from(self.step));
        // Scalars as ATen casts them into a float kernel.
        let k = Consts {
            weight_decay: self.weight_decay as f32,
            beta1: BETA1 as f32,
            one_minus_beta1: (1.0 - BETA1) as f32,
            beta2: BETA2 as f32,
            one_minus_beta2: (1.0 - BETA2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: EPS as f32,
            neg_step_size: (-(self.lr / bias_correction1)) as f32,
            fused: self.fused,
        };
        for s in &mut self.slots {
            let g = s.param.grad();
            if !g.defined() {
                continue;
            }
            let g = g.contiguous();
            debug_assert_eq!(g.numel(), s.exp_avg.len());
            // SAFETY: a contiguous f32 CPU gradient of the parameter's size (the parameter is
            // contiguous f32 on the CPU, checked at construction), read only.
            #[allow(unsafe_code)]
            let g =
                unsafe { std::slice::from_raw_parts(g.data_ptr() as *const f32, s.exp_avg.len()) };
            update(&k, s, g);
        }
    }
}

struct Consts {
    weight_decay: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
    fused: bool,
}

fn update(k: &Consts, s: &mut Slot, g: &[f32]) {
    let n = s.exp_avg.len();
    // SAFETY: `exp_avg_sq` and `sqrt` are contiguous f32 CPU tensors of n elements made at
    // construction, the parameter is one too (checked there); none aliases another or `g`,
    // and nothing else touches them during the step.
    #[allow(unsafe_code)]
    let (p, v) = unsafe {
        (
            std::slice::from_raw_parts_mut(s.param.data_ptr() as *mut f32, n),
            std::slice::from_raw_parts_mut(s.exp_avg_sq.data_ptr() as *mut f32, n),
        )
    };
    moments(k, p, g, &mut s.exp_avg, v);
    // ATen's sqrt (MKL's vector sqrt on x86) is not always the correctly rounded square root,
    // so it stays ATen's: one pass into a buffer kept for it.
    let _ = s.exp_avg_sq.sqrt_out(&s.sqrt);
    #[allow(unsafe_code)]
    let sqrt = unsafe { std::slice::from_raw_parts(s.sqrt.data_ptr() as *const f32, n) };
    apply(k, p, &s.exp_avg, sqrt);
}

/// grad.add(p, weight_decay); exp_avg.mul_(beta1).add_(grad, 1 - beta1);
/// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2). ATen's add with alpha is
/// fmadd(other, alpha, self) and its addcmul self + value * t1 * t2: one rounding for the
/// multiply-add where ATen's build fuses it, two where it does not.
fn moments(k: &Consts, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    if !k.fused {
        return moments_unfused(k, p, g, m, v);
    }
    #[cfg(target_arch = "x86_64")]
    if fma() {
        // SAFETY: the CPU has FMA and AVX2.
        #[allow(unsafe_code)]
        unsafe {
            moments_fma(k, p, g, m, v)
        };
        return;
    }
    moments_fused(k, p, g, m, v);
}

fn moments_unfused(k: &Consts, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for ((&p, &g), (m, v)) in p.iter().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
        let g = g + k.weight_decay * p;
        *m = *m * k.beta1 + k.one_minus_beta1 * g;
        *v = *v * k.beta2 + k.one_minus_beta2 * g * g;
    }
}

/// denom = (sqrt(exp_avg_sq) / sqrt(bias_correction2)).add_(eps);
/// p.addcdiv_(exp_avg, denom, -step_size): self + value * t1 / t2.
fn apply(k: &Consts, p: &mut [f32], m: &[f32], sqrt: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if fma() {
        // SAFETY: the CPU has FMA and AVX2.
        #[allow(unsafe_code)]
        unsafe {
            apply_avx2(k, p, m, sqrt)
        };
        return;
    }
    apply_portable(k, p, m, sqrt);
}

/// Eight lanes at a time; Rust never contracts a multiply and an add, so this is exactly the
/// portable loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
#[allow(unsafe_code)]
unsafe fn apply_avx2(k: &Consts, p: &mut [f32], m: &[f32], sqrt: &[f32]) {
    apply_portable(k, p, m, sqrt);
}

#[inline(always)]
fn apply_portable(k: &Consts, p: &mut [f32], m: &[f32], sqrt: &[f32]) {
    for ((p, &m), &s) in p.iter_mut().zip(m).zip(sqrt) {
        let denom = s / k.bias_correction2_sqrt + k.eps;
        *p += k.neg_step_size * m / denom;
    }
}

#[cfg(target_arch = "x86_64")]
fn fma() -> bool {
    std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2")
}

/// The same loop compiled with FMA, so that `mul_add` is one instruction and the loop
/// vectorises; `mul_add` is exactly rounded either way, so both give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
#[allow(unsafe_code)]
unsafe fn moments_fma(k: &Consts, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    moments_fused(k, p, g, m, v);
}

#[inline(always)]
fn moments_fused(k: &Consts, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for ((&p, &g), (m, v)) in p.iter().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
        let g = p.mul_add(k.weight_decay, g);
        *m = g.mul_add(k.one_minus_beta1, *m * k.beta1);
        *v = (k.one_minus_beta2 * g).mul_add(g, *v * k.beta2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};

    /// Parameters of the DDQN's shapes (a full-width layer, a bias, the 2-row output) with
    /// gradients from a fixed loss, stepped by libtorch's Adam and by the fused one.
    #[test]
    fn fused_adam_equals_libtorch_adam_bit_for_bit() {
        tch::manual_seed(7);
        let shapes: [&[i64]; 4] = [&[512, 117], &[512], &[2, 512], &[2]];
        let make = || {
            let vs = nn::VarStore::new(Device::Cpu);
            for (i, s) in shapes.iter().enumerate() {
                let init = Tensor::randn(*s, (Kind::Float, Device::Cpu)) * 0.05;
                let _ = vs.root().var_copy(&format!("p{i}"), &init);
            }
            vs
        };
        tch::manual_seed(7);
        let a = make();
        let mut b = make();
        b.copy(&a).unwrap();
        let mut torch = nn::Adam {
            wd: 1e-6,
            ..Default::default()
        }
        .build(&a, 1e-4)
        .unwrap();
        let Some(fused) = FusedAdam::for_this_cpu(b.trainable_variables(), 1e-4, 1e-6) else {
            eprintln!("not x86-64: libtorch's Adam is used, nothing to compare");
            return;
        };
        let mut fused = fused.unwrap();
        let loss = |vs: &nn::VarStore, step: i64| {
            let mut l = Tensor::zeros([], (Kind::Float, Device::Cpu));
            for (k, t) in vs.trainable_variables().iter().enumerate() {
                let w = (step * 31 + k as i64) as f64 * 0.01;
                l += (t * (t.sin() + w)).sum(Kind::Float);
            }
            l
        };
        eprintln!(
            "ATen CPU capability {}",
            flag_core::numerics::cpu_capability()
        );
        for step in 0..25 {
            torch.zero_grad();
            loss(&a, step).backward();
            torch.clip_grad_norm(1.0);
            torch.step();
            fused.zero_grad();
            loss(&b, step).backward();
            fused.clip_grad_norm(1.0);
            fused.step();
            for (i, (x, y)) in a
                .trainable_variables()
                .iter()
                .zip(b.trainable_variables())
                .enumerate()
            {
                let (x, y) = (
                    Vec::<f32>::try_from(x.flatten(0, -1)).unwrap(),
                    Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(),
                );
                let diff = x.iter().zip(&y).filter(|(p, q)| p.to_bits() != q.to_bits());
                let diff = diff.count();
                assert_eq!(
                    diff,
                    0,
                    "step {step}, parameter {i}: {diff} of {} differ",
                    x.len()
                );
            }
        }
    }
}
