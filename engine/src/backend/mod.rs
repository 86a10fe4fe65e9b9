//! Where the arithmetic runs. Inference, evaluation, calibration capture and the quantizers reach the
//! kernels through a [`Backend`] value (the model carries one), so a GPU backend is a new variant with its
//! own module beside [`cpu`], not a rewrite of the callers.

pub mod cpu;
pub mod cpu_q8;
mod cpu_q8_iq;
pub mod cpu_q8_repack;
pub mod cpu_q8_tile;
mod int_dot;
pub mod sgemm;
pub mod spin;
pub mod wgpu;

use std::sync::OnceLock;

use crate::tensor::TensorRef;

/// The device a model's arithmetic runs on.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU kernels ([`cpu`]): rayon threads, AVX2 where the CPU has it.
    #[default]
    Cpu,
    /// The wgpu kernels ([`wgpu`]) on the process's GPU. A call the GPU cannot complete (out of memory,
    /// a lost device) is computed on the CPU instead and the reason kept in [`gpu_fallback`].
    Gpu,
}

static FALLBACK: OnceLock<String> = OnceLock::new();

/// Whether the CPU kernels may use AVX-512 where the CPU has it: `QS_CPU=avx2` in the environment makes
/// them run as on a CPU with AVX2 and FMA only (no integer tiles, no repacked decoding, the AVX2 GEMM
/// microkernel), so those paths — the ones most desktop CPUs take — can be tested and timed on this one.
pub fn avx512_allowed() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QS_CPU").map_or(true, |v| v.trim() != "avx2"))
}

/// Why GPU work went to the CPU, once it has (the GPU is then left alone for the rest of the process).
pub fn gpu_fallback() -> Option<&'static str> {
    FALLBACK.get().map(String::as_str)
}

/// Whether GPU work may still be tried (it has not failed in this process).
pub fn gpu_usable() -> bool {
    FALLBACK.get().is_none()
}

/// Record that GPU work failed with `e` (once, also on stderr): from now on the CPU computes.
pub fn gpu_failed(e: &crate::Error) {
    let msg = format!("{e}; continuing on the CPU");
    if FALLBACK.set(msg.clone()).is_ok() {
        eprintln!("warning: {msg}");
    }
}

/// Run `f` on the GPU unless it has failed before; on failure record why (once, also on stderr) and
/// return `None` so the caller computes on the CPU.
pub(crate) fn on_gpu<T>(f: impl FnOnce(&wgpu::Gpu) -> crate::Result<T>) -> Option<T> {
    if FALLBACK.get().is_some() {
        return None;
    }
    match wgpu::gpu().and_then(f) {
        Ok(v) => Some(v),
        Err(e) => {
            gpu_failed(&e);
            None
        }
    }
}

impl Backend {
    /// Every backend this build has.
    pub const ALL: [Backend; 2] = [Backend::Cpu, Backend::Gpu];

    /// `"cpu"`, `"gpu"`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
        }
    }

    /// `auto`: the GPU when a hardware adapter is present (a software one such as lavapipe is slower than
    /// the CPU kernels), else the CPU.
    pub fn auto() -> Self {
        match wgpu::adapter() {
            Ok(a) if !a.is_software() => Backend::Gpu,
            _ => Backend::Cpu,
        }
    }

    /// What to tell the user about where the arithmetic runs: `"cpu"`, `"gpu: NVIDIA H100 (Vulkan)"`.
    pub fn describe(self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Gpu => match wgpu::adapter() {
                Ok(a) => format!("gpu: {}", a.label()),
                Err(e) => format!("gpu unavailable ({e})"),
            },
        }
    }

    /// A backend by name (`"cpu"`, `"gpu"`; `"auto"` chooses with [`Backend::auto`]).
    pub fn parse(s: &str) -> Option<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Some(Self::auto());
        }
        Self::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s.trim()))
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `n` activation rows `x` (`[n, cols]`); `out` is `[n, rows]`.
    /// The weight stays in its stored form.
    pub fn matmul(self, w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) {
        match self {
            Backend::Cpu => cpu::matmul(w, x, n, out),
            Backend::Gpu => {
                if on_gpu(|g| g.matmul(w, x, n, out)).is_none() {
                    cpu::matmul(w, x, n, out);
                }
            }
        }
    }

    /// `y[n, m] = x[n, k] · w[m, k]ᵀ` in f32 (attention scores).
    pub fn sgemm_nt(self, n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        match self {
            Backend::Cpu => cpu::sgemm_nt(n, m, k, x, w, y),
            Backend::Gpu => {
                if on_gpu(|g| g.sgemm(n, m, k, x, w, y, false)).is_none() {
                    cpu::sgemm_nt(n, m, k, x, w, y);
                }
            }
        }
    }

    /// `y[n, m] = x[n, k] · w[k, m]` in f32 (attention-weighted values).
    pub fn sgemm_nn(self, n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        match self {
            Backend::Cpu => cpu::sgemm_nn(n, m, k, x, w, y),
            Backend::Gpu => {
                if on_gpu(|g| g.sgemm(n, m, k, x, w, y, true)).is_none() {
                    cpu::sgemm_nn(n, m, k, x, w, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for b in Backend::ALL {
            assert_eq!(Backend::parse(b.name()), Some(b));
        }
        assert_eq!(Backend::parse("CPU"), Some(Backend::Cpu));
        assert_eq!(Backend::parse("tpu"), None);
    }
}
