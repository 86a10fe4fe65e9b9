//! Where the arithmetic runs. Inference, evaluation, calibration capture and the quantizers reach the
//! kernels through a [`Backend`] value (the model carries one), so a GPU backend is a new variant with its
//! own module beside [`cpu`], not a rewrite of the callers.

pub mod cpu;

use crate::tensor::TensorRef;

/// The device a model's arithmetic runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU kernels ([`cpu`]): rayon threads, AVX2 where the CPU has it.
    #[default]
    Cpu,
}

impl Backend {
    /// Every backend this build has.
    pub const ALL: [Backend; 1] = [Backend::Cpu];

    /// `"cpu"`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
        }
    }

    /// A backend by name (`"cpu"`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s.trim()))
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `n` activation rows `x` (`[n, cols]`); `out` is `[n, rows]`.
    /// The weight stays in its stored form.
    pub fn matmul(self, w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) {
        match self {
            Backend::Cpu => cpu::matmul(w, x, n, out),
        }
    }

    /// `y[n, m] = x[n, k] · w[m, k]ᵀ` in f32 (attention scores).
    pub fn sgemm_nt(self, n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        match self {
            Backend::Cpu => cpu::sgemm_nt(n, m, k, x, w, y),
        }
    }

    /// `y[n, m] = x[n, k] · w[k, m]` in f32 (attention-weighted values).
    pub fn sgemm_nn(self, n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        match self {
            Backend::Cpu => cpu::sgemm_nn(n, m, k, x, w, y),
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
