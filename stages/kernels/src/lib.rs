//! CPU kernels whose arithmetic is fixed by their source, so that their results are the same
//! bits on every x86-64 machine and at every instruction-set level: the f32 matrix product
//! ([`gemm`]) and transposes. The DDQN network trains on them (`flag-rl`), and the LLM's
//! prefill multiplies its expanded weight slabs with them (`flag-llm`).

mod gemm;

#[cfg(target_arch = "x86_64")]
pub use gemm::transpose16;
pub use gemm::{Level, Strided, gemm, transpose};

/// `fn name(args) -> ret { body }` becomes `name(level, args)`: the body compiled for
/// `level`'s instruction set (capped at what this CPU has). What the body calls must be
/// `#[inline(always)]` to be compiled inside each wrapper; the result does not depend on the
/// level.
#[macro_export]
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            #[allow(clippy::too_many_arguments)]
            fn wide($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn narrow($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match level.here() {
                // SAFETY: `here` never names an instruction set this CPU lacks.
                #[cfg(target_arch = "x86_64")]
                $crate::Level::Avx512 => {
                    #[allow(unsafe_code)]
                    unsafe { wide($($arg),*) }
                }
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::Level::Avx2 => {
                    #[allow(unsafe_code)]
                    unsafe { narrow($($arg),*) }
                }
                _ => body($($arg),*),
            }
        }
    };
}
