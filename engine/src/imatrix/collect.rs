//! Computing an importance matrix with our forward pass, as `llama-imatrix -f TEXT -c N_CTX` does: the
//! text is tokenized once (BOS first when the model adds one), cut into chunks of `n_ctx` tokens whose
//! first token becomes BOS, each chunk runs from an empty cache, and for every decoder-layer matmul the
//! squares of its input columns are summed over all tokens (`shared/reference/gguf.md` §6.1).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Imatrix, ImatrixEntry};
use crate::eval::{tokenize_text, EvalOptions};
use crate::infer::{Logits, MatmulInput, MatmulObserver, Model};
use crate::model::TextTokenizer;
use crate::{Error, Result};

/// How the calibration text is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImatrixOptions {
    /// Tokens per chunk (`-c`, default 512).
    pub n_ctx: usize,
    /// At most this many chunks (`--chunks`).
    pub max_chunks: Option<usize>,
    /// Where the arithmetic runs.
    pub backend: crate::backend::Backend,
}

impl Default for ImatrixOptions {
    fn default() -> Self {
        Self {
            n_ctx: 512,
            max_chunks: None,
            backend: crate::backend::Backend::Cpu,
        }
    }
}

/// Sums of squares per (layer, input), in f64.
#[derive(Default)]
struct Collector {
    sums: BTreeMap<(usize, u8), (MatmulInput, Vec<f64>, u64)>,
    non_finite: Option<(usize, MatmulInput)>,
}

fn site_key(i: MatmulInput) -> u8 {
    match i {
        MatmulInput::Attention => 0,
        MatmulInput::AttentionOutput => 1,
        MatmulInput::Ffn => 2,
        MatmulInput::FfnDown => 3,
    }
}

impl Collector {
    /// Add a chunk's sums of squares made on the device (`Model::squares_on_device`'s layout) over `n`
    /// tokens.
    fn add_device_sums(&mut self, model: &Model, sums: &[f32], n: usize) {
        let c = model.config();
        let (h, attn) = (c.hidden_size, c.num_heads * c.head_dim);
        let sites = [
            (MatmulInput::Attention, 0, h),
            (MatmulInput::AttentionOutput, h, attn),
            (MatmulInput::Ffn, h + attn, h),
            (MatmulInput::FfnDown, 2 * h + attn, c.intermediate_size),
        ];
        for (layer, per) in sums.chunks_exact(model.squares_per_layer()).enumerate() {
            for &(input, off, cols) in &sites {
                let e = self
                    .sums
                    .entry((layer, site_key(input)))
                    .or_insert_with(|| (input, vec![0.0; cols], 0));
                for (s, &v) in e.1.iter_mut().zip(&per[off..off + cols]) {
                    *s += f64::from(v);
                }
                e.2 += n as u64;
                if self.non_finite.is_none() && per[off..off + cols].iter().any(|v| !v.is_finite())
                {
                    self.non_finite = Some((layer, input));
                }
            }
        }
    }
}

impl MatmulObserver for Collector {
    fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], n: usize) {
        if n == 0 {
            return;
        }
        let cols = x.len() / n;
        let e = self
            .sums
            .entry((layer, site_key(input)))
            .or_insert_with(|| (input, vec![0.0; cols], 0));
        for row in x.chunks_exact(cols) {
            for (s, &v) in e.1.iter_mut().zip(row) {
                *s += f64::from(v) * f64::from(v);
            }
        }
        e.2 += n as u64;
        if self.non_finite.is_none() && x.iter().any(|v| !v.is_finite()) {
            self.non_finite = Some((layer, input));
        }
    }
}

/// Compute the importance matrix of `model` on `text`. `dataset` is recorded in the file (llama.cpp
/// records the calibration file's path). `progress(done, total)` is called per chunk; `false` cancels.
pub fn compute_imatrix(
    model: &Model,
    tok: &TextTokenizer,
    text: &str,
    dataset: &str,
    opts: &ImatrixOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Imatrix> {
    let tokens = tokenize_text(tok, text)?;
    let eval_opts = EvalOptions {
        n_ctx: opts.n_ctx,
        max_chunks: opts.max_chunks,
        ..EvalOptions::default()
    };
    let plan = crate::eval::ChunkPlan::new(&tokens, &eval_opts, crate::eval::chunk_bos(tok))
        .map_err(|e| Error::Invalid(e.to_string().replace("perplexity", "an importance matrix")))?;
    let mut col = Collector::default();
    if !progress(0, plan.n_chunks) {
        return Err(Error::Cancelled);
    }
    let mut cache = model.new_cache(plan.n_ctx);
    for k in 0..plan.n_chunks {
        let input = plan.input(k);
        let mut on_device = false;
        if model.forwards_on_device() {
            // The squares summed on the device: only a few floats per layer come back.
            cache.clear();
            match model.squares_on_device(&input, &mut cache) {
                Ok(sums) => {
                    col.add_device_sums(model, &sums, input.len());
                    on_device = true;
                }
                Err(e @ Error::Gpu(_)) => crate::backend::gpu_failed(&e),
                Err(e) => return Err(e),
            }
        }
        if !on_device {
            cache.clear();
            model.forward_observed(&input, &mut cache, Logits::None, Some(&mut col))?;
        }
        if let Some((layer, input)) = col.non_finite {
            return Err(Error::Invalid(format!(
                "non-finite activations in layer {layer} ({input:?}) of chunk {k}: the model is broken"
            )));
        }
        if !progress(k + 1, plan.n_chunks) {
            return Err(Error::Cancelled);
        }
    }
    let mut entries = BTreeMap::new();
    for ((layer, _), (input, sums, count)) in col.sums {
        let sums: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
        for w in input.gguf_weights() {
            entries.insert(
                format!("blk.{layer}.{w}.weight"),
                ImatrixEntry {
                    sums: sums.clone(),
                    counts: vec![count as f32],
                },
            );
        }
    }
    Ok(Imatrix {
        datasets: vec![dataset.to_owned()],
        chunk_count: plan.n_chunks as u32,
        chunk_size: plan.n_ctx as u32,
        entries,
        legacy: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::perplexity::tests::fixture_model;

    #[test]
    fn sums_are_the_squares_of_the_matmul_inputs() {
        let (model, tok) = fixture_model(7);
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let opts = ImatrixOptions {
            backend: crate::backend::Backend::Cpu,
            n_ctx: 32,
            max_chunks: Some(3),
        };
        let m = compute_imatrix(&model, &tok, &text, "fox.txt", &opts, &mut |_, _| true)
            .expect("imatrix");
        assert_eq!((m.chunk_count, m.chunk_size), (3, 32));
        assert_eq!(m.datasets, vec!["fox.txt".to_owned()]);
        let layers = model.config().num_layers;
        assert_eq!(m.entries.len(), 7 * layers);
        // q, k, v share their input; gate and up too.
        let q = &m.entries["blk.0.attn_q.weight"];
        assert_eq!(q, &m.entries["blk.0.attn_v.weight"]);
        assert_eq!(q.counts, vec![96.0]);
        assert_eq!(
            m.entries["blk.0.ffn_down.weight"].sums.len(),
            model.config().intermediate_size
        );

        // Recompute layer 0's attention input by hand: RMS-normed embeddings of each chunk's tokens.
        let tokens = tokenize_text(&tok, &text).expect("tokens");
        let plan = crate::eval::ChunkPlan::new(
            &tokens,
            &EvalOptions {
                n_ctx: 32,
                max_chunks: Some(3),
                ..EvalOptions::default()
            },
            crate::eval::chunk_bos(&tok),
        )
        .expect("plan");
        let h = model.config().hidden_size;
        let mut want = vec![0.0f64; h];
        let mut obs = Recorder::default();
        for k in 0..3 {
            let mut cache = model.new_cache(32);
            model
                .forward_observed(&plan.input(k), &mut cache, Logits::None, Some(&mut obs))
                .expect("forward");
        }
        for x in &obs.attn0 {
            for (w, &v) in want.iter_mut().zip(x) {
                *w += f64::from(v) * f64::from(v);
            }
        }
        for (a, b) in q.sums.iter().zip(&want) {
            assert!((f64::from(*a) - b).abs() <= 1e-6 * b.max(1.0), "{a} vs {b}");
        }
        let w = m.weights("blk.0.attn_q.weight").expect("weights");
        assert!((f64::from(w[0]) - want[0] / 96.0).abs() < 1e-6 * want[0].max(1.0));

        // Observing changes nothing in the logits.
        let mut c1 = model.new_cache(32);
        let mut c2 = model.new_cache(32);
        let a = model
            .forward(&plan.input(0), &mut c1, Logits::All)
            .expect("fwd");
        let b = model
            .forward_observed(&plan.input(0), &mut c2, Logits::All, Some(&mut obs))
            .expect("fwd");
        assert_eq!(a, b);
    }

    /// Keeps layer 0's attention inputs, row by row.
    #[derive(Default)]
    struct Recorder {
        attn0: Vec<Vec<f32>>,
    }

    impl MatmulObserver for Recorder {
        fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], n: usize) {
            if layer == 0 && input == MatmulInput::Attention {
                self.attn0
                    .extend(x.chunks_exact(x.len() / n).map(<[f32]>::to_vec));
            }
        }
    }

    #[test]
    fn short_text_and_cancel_are_errors() {
        let (model, tok) = fixture_model(7);
        let opts = ImatrixOptions {
            backend: crate::backend::Backend::Cpu,
            n_ctx: 64,
            max_chunks: None,
        };
        let e = compute_imatrix(&model, &tok, "too short", "x", &opts, &mut |_, _| true)
            .expect_err("short");
        assert!(e.to_string().contains("importance matrix"), "{e}");
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let e = compute_imatrix(&model, &tok, &text, "x", &opts, &mut |d, _| d == 0)
            .expect_err("cancel");
        assert!(matches!(e, Error::Cancelled));
    }

    /// Our statistics on SmolLM2 (4 chunks of the bundled text) against `llama-imatrix`'s on the same
    /// F16 file (fixture pruned to layers 0 and 29, see make_imatrix_hashes.py). llama.cpp rounds
    /// activations to f16 inside its F16 matmuls, so the sums agree to about 1e-3, not bit for bit.
    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn smollm2_matches_llama_imatrix() {
        let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/smollm2/smollm2_imatrix_4chunks_l0_29.gguf");
        let want = Imatrix::read(&fixture).expect("fixture");
        let dir = tempfile::tempdir().expect("tempdir");
        let src = crate::testing::smollm2_f16(dir.path());
        let model = Model::load(&src).expect("load");
        let got = compute_imatrix(
            &model,
            &src.tokenizer,
            include_str!("../../../assets/calibration/rust-book.txt"),
            "rust-book.txt",
            &ImatrixOptions {
                backend: crate::backend::Backend::Cpu,
                n_ctx: 512,
                max_chunks: Some(4),
            },
            &mut |_, _| true,
        )
        .expect("imatrix");
        assert_eq!(
            (got.chunk_count, got.chunk_size),
            (want.chunk_count, want.chunk_size)
        );
        assert_eq!(got.entries.len(), 30 * 7);
        assert_eq!(want.entries.len(), 2 * 7);
        for (name, w) in &want.entries {
            let g = &got.entries[name];
            assert_eq!(g.counts, w.counts, "{name}");
            let (mut d2, mut n2) = (0.0f64, 0.0f64);
            for (a, b) in g.sums.iter().zip(&w.sums) {
                d2 += f64::from(a - b).powi(2);
                n2 += f64::from(*b).powi(2);
            }
            let rel = (d2 / n2).sqrt();
            assert!(rel < 5e-3, "{name}: relative difference {rel}");
        }
    }
}
