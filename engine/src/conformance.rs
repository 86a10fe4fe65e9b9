//! Conformance of every backend with the CPU reference, written once and run per backend: the weights a
//! backend multiplies with (bit for bit, for every block type), its matmuls over stored weights (any shape,
//! tile edges, llama.cpp's interleaved Q/K rows, the types dequantised on the host), the attention
//! products, and a whole evaluation. On this machine and in CI the GPU is Mesa's lavapipe: a missing
//! adapter fails these tests rather than skipping them, and the sizes stay small.

use rand::{Rng, SeedableRng};

use crate::backend::{wgpu, Backend};
use crate::codecs::GgmlType;
use crate::tensor::{Bytes, TensorRef};

/// The backends checked against [`Backend::Cpu`].
const OTHERS: [Backend; 1] = [Backend::Gpu];

fn gpu() -> &'static wgpu::Gpu {
    wgpu::gpu().unwrap_or_else(|e| {
        panic!("{e}: the GPU tests need an adapter (Debian: apt-get install mesa-vulkan-drivers)")
    })
}

fn normal(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Sum of uniforms: close enough to normal, with the odd outlier from the scale below.
            let s: f32 = (0..4).map(|_| rng.gen::<f32>() - 0.5).sum();
            s * scale
        })
        .collect()
}

/// A `[rows, cols]` tensor of `ty` quantized from random values by the type's own quantizer.
fn tensor(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> TensorRef {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = ty.traits();
    let mut v = normal(&mut rng, rows * cols, 0.05);
    // A few outliers per row, as real weights have.
    for r in 0..rows {
        let c = rng.gen_range(0..cols);
        v[r * cols + c] *= 20.0;
    }
    let row_bytes = t.row_bytes(cols).expect("whole blocks");
    let mut data = vec![0u8; rows * row_bytes];
    let quantize = t.quantize.expect("a quantizer");
    let ones = vec![1.0f32; cols];
    let lowbit = matches!(
        ty,
        GgmlType::Iq2Xxs
            | GgmlType::Iq2Xs
            | GgmlType::Iq2S
            | GgmlType::Iq3Xxs
            | GgmlType::Iq3S
            | GgmlType::Iq1S
            | GgmlType::Iq1M
    );
    let imatrix = lowbit.then_some(ones.as_slice());
    for (src, dst) in v.chunks_exact(cols).zip(data.chunks_exact_mut(row_bytes)) {
        quantize(src, dst, imatrix);
    }
    TensorRef::new(
        format!("w.{}", t.name),
        vec![rows, cols],
        ty,
        Bytes::owned(data),
    )
    .expect("valid tensor")
}

/// Normalised error `‖a − b‖² / ‖b‖²` (llama.cpp's test-backend-ops measure).
fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let (mut e, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        e += ((x - y) as f64).powi(2);
        n += (y as f64).powi(2);
    }
    e / n.max(1e-30)
}

#[test]
fn every_shader_parses_and_validates_with_naga() {
    let all = wgpu::kernels::all_sources();
    assert_eq!(
        all.len(),
        4 + 19 + 7 + 6 + 1 + 5 + 3 * 22,
        "the GEMM (four element-wise W storages and the 19 quantized block types), seven ops, six grouped \
         formats, the exact-arithmetic check, five quantizers and three drivers over 22 block types"
    );
    for (name, src) in all {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(&src)));
        // Only the variants run where the adapter offers them use shader-f16 or subgroups.
        let optional = name.contains("F16 W") || name.contains("MatvecSubgroups");
        let caps = if optional {
            naga::valid::Capabilities::SHADER_FLOAT16 | naga::valid::Capabilities::SUBGROUP
        } else {
            naga::valid::Capabilities::empty()
        };
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
            .subgroup_operations(naga::valid::SubgroupOperationSet::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(&src)));
    }
}

#[test]
fn the_gpu_dequantises_every_kernel_type_exactly_as_the_cpu() {
    let g = gpu();
    let mut covered = 0;
    for ty in GgmlType::all() {
        if wgpu::kernels::block_files(ty).is_none() {
            continue;
        }
        covered += 1;
        let w = tensor(ty, 5, 512, ty as u64);
        let want = w.to_f32();
        let got = wgpu::weights::dequantize(g, &w).expect("gpu dequantisation");
        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            bad,
            0,
            "{}: {bad} of {} values differ from the CPU's (first: {:?})",
            ty.traits().name,
            want.len(),
            got.iter().zip(&want).find(|(a, b)| a != b)
        );
    }
    assert_eq!(
        covered, 22,
        "every ggml type has a GPU dequantisation kernel"
    );
}

#[test]
fn matmuls_agree_with_the_cpu_for_every_type_and_awkward_shapes() {
    let _ = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Rows and token counts that are not multiples of the 64 × 64 tiles; 1 token is decoding.
    let shapes = [
        (70usize, 256usize, 1usize),
        (65, 256, 3),
        (33, 512, 5),
        (130, 256, 67),
    ];
    for ty in GgmlType::all() {
        for (i, &(rows, cols, n)) in shapes.iter().enumerate() {
            if ty.traits().block_elems > cols {
                continue;
            }
            let w = tensor(ty, rows, cols, 100 + i as u64);
            let x = normal(&mut rng, n * cols, 1.0);
            let mut want = vec![0.0f32; n * rows];
            Backend::Cpu.matmul(&w, &x, n, &mut want);
            for b in OTHERS {
                let mut got = vec![f32::NAN; n * rows];
                b.matmul(&w, &x, n, &mut got);
                let e = nmse(&got, &want);
                assert!(
                    e < 1e-10,
                    "{} {}: {rows}×{cols} · {n} tokens: normalised error {e:e}",
                    b.name(),
                    ty.traits().name
                );
            }
        }
    }
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
    // Prompts of every quantized type ran through the GEMM that decodes the blocks as it stages them.
    let g = gpu();
    for ty in GgmlType::all() {
        if wgpu::kernels::has_sub_blocks(ty) {
            let key = wgpu::kernels::Key::Gemm {
                kmajor: false,
                xkmajor: false,
                subtract: false,
                w: wgpu::kernels::WStore::Blocks(ty),
            };
            assert!(
                crate::backend::wgpu::lock(&g.pipelines).contains_key(&key),
                "{}: the block-decoding GEMM ran",
                ty.traits().name
            );
        }
    }
}

#[test]
fn kernels_with_and_without_shader_f16_and_subgroups_agree_with_the_cpu() {
    use wgpu::kernels::{Driver, Key, WStore};
    let g = gpu();
    assert!(
        g.uses_subgroups() && g.uses_f16(),
        "the adapter offers shader-f16 and subgroups (lavapipe does): both paths are tested"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let has = |k: Key| crate::backend::wgpu::lock(&g.pipelines).contains_key(&k);
    for on in [true, false] {
        g.set_optional_features(on);
        for ty in [
            GgmlType::F16,
            GgmlType::Q4K,
            GgmlType::Q8_0,
            GgmlType::Iq2Xs,
        ] {
            for (rows, cols, n) in [(70usize, 256usize, 1usize), (130, 512, 67), (128, 256, 70)] {
                let mut w = tensor(ty, rows, cols, 7 + n as u64);
                // Interleaved Q/K rows need an even head dimension.
                w.rope_interleaved_heads = (rows == 128).then_some(2);
                let x = normal(&mut rng, n * cols, 1.0);
                let mut want = vec![0.0f32; n * rows];
                Backend::Cpu.matmul(&w, &x, n, &mut want);
                let mut got = vec![f32::NAN; n * rows];
                Backend::Gpu.matmul(&w, &x, n, &mut got);
                let e = nmse(&got, &want);
                let what = format!(
                    "{} {rows}×{cols} · {n}, optional features {on}",
                    ty.traits().name
                );
                assert!(e < 1e-10, "{what}: normalised error {e:e}");
            }
        }
        let (matvec, w) = if on {
            (Driver::MatvecSubgroups, WStore::F16)
        } else {
            (Driver::Matvec, WStore::F16Bits)
        };
        assert!(has(Key::Block(matvec, GgmlType::Q4K)), "{matvec:?} ran");
        assert!(
            has(Key::Gemm {
                kmajor: false,
                xkmajor: false,
                subtract: false,
                w
            }),
            "the GEMM read F16 weights as {w:?}"
        );
    }
    g.set_optional_features(true);
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn interleaved_qk_rows_come_out_in_hugging_face_order() {
    let _ = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (rows, cols) = (128, 256);
    for (ty, n) in [(GgmlType::F16, 3), (GgmlType::Q4K, 3), (GgmlType::Q4K, 9)] {
        let mut w = tensor(ty, rows, cols, 5);
        w.rope_interleaved_heads = Some(2);
        let x = normal(&mut rng, n * cols, 1.0);
        let mut want = vec![0.0f32; n * rows];
        Backend::Cpu.matmul(&w, &x, n, &mut want);
        for b in OTHERS {
            let mut got = vec![0.0f32; n * rows];
            b.matmul(&w, &x, n, &mut got);
            assert!(
                nmse(&got, &want) < 1e-10,
                "{} {}",
                b.name(),
                ty.traits().name
            );
        }
    }
}

#[test]
fn attention_products_agree_with_the_cpu() {
    let _ = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for &(n, m, k) in &[
        (1usize, 1usize, 1usize),
        (7, 65, 64),
        (64, 130, 48),
        (33, 64, 129),
    ] {
        let x = normal(&mut rng, n * k, 1.0);
        let w = normal(&mut rng, m * k, 1.0);
        let (mut nt, mut nn) = (vec![0.0f32; n * m], vec![0.0f32; n * m]);
        Backend::Cpu.sgemm_nt(n, m, k, &x, &w, &mut nt);
        Backend::Cpu.sgemm_nn(n, m, k, &x, &w, &mut nn);
        for b in OTHERS {
            let (mut g_nt, mut g_nn) = (vec![0.0f32; n * m], vec![0.0f32; n * m]);
            b.sgemm_nt(n, m, k, &x, &w, &mut g_nt);
            b.sgemm_nn(n, m, k, &x, &w, &mut g_nn);
            assert!(nmse(&g_nt, &nt) < 1e-10, "{} nt {n}×{m}×{k}", b.name());
            assert!(nmse(&g_nn, &nn) < 1e-10, "{} nn {n}×{m}×{k}", b.name());
        }
    }
}

#[test]
fn a_weight_is_uploaded_once() {
    let g = gpu();
    let w = tensor(GgmlType::Q8_0, 64, 256, 9);
    let a = g.weight(&w).expect("upload");
    let b = g.weight(&w).expect("cached");
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "the second use finds the first upload"
    );
}

/// The fixture Llama with its linears quantized to `ty` (the rest as the fixture stores it).
fn quantized_fixture(ty: GgmlType) -> crate::infer::Model {
    use crate::model::fixture::{fixture_tensor_refs, FixtureSpec};
    let spec = FixtureSpec::tiny_llama();
    let mut tensors = fixture_tensor_refs(&spec).expect("tensors");
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("proj.weight") && t.cols() % ty.traits().block_elems == 0 {
            let (rows, cols) = (t.rows(), t.cols());
            let v = t.to_f32();
            let rb = ty.traits().row_bytes(cols).expect("blocks");
            let mut data = vec![0u8; rows * rb];
            let q = ty.traits().quantize.expect("quantizer");
            for (src, dst) in v.chunks_exact(cols).zip(data.chunks_exact_mut(rb)) {
                q(src, dst, None);
            }
            *t = TensorRef::new(name.clone(), vec![rows, cols], ty, Bytes::owned(data))
                .expect("tensor");
        }
    }
    crate::infer::Model::from_parts(std::path::Path::new("fixture"), &spec.config(), &tensors)
        .expect("model")
}

#[test]
fn evaluation_gives_the_cpus_perplexity_and_kld() {
    use crate::eval::perplexity::tests::{fixture_model, TEXT};
    use crate::eval::{kl_divergence, perplexity, EvalOptions};
    let _ = gpu();
    let (base, tok) = fixture_model(1);
    let variant = quantized_fixture(GgmlType::Q4_0);
    let text = TEXT.repeat(3);
    let opts = EvalOptions {
        n_ctx: 64,
        max_chunks: Some(2),
        ..EvalOptions::default()
    };
    let ppl = |m: &crate::infer::Model| {
        perplexity(m, &tok, &text, &opts, &mut |_| true)
            .expect("ppl")
            .ppl
    };
    let kld = |b: &crate::infer::Model, v: &crate::infer::Model| {
        kl_divergence(b, v, &tok, &text, &opts, &mut |_| true).expect("kld")
    };
    let ppl_cpu = ppl(&base);
    let kld_cpu = kld(&base, &variant);
    let mean = |r: &crate::eval::KldReport| r.stats.kld.mean.value;
    assert!(
        mean(&kld_cpu) > 1e-4,
        "the Q4_0 variant differs from its base ({})",
        mean(&kld_cpu)
    );
    let scored = || crate::infer::gpu::DEVICE_SCORED.load(std::sync::atomic::Ordering::Relaxed);
    for b in OTHERS {
        let before = scored();
        let ppl_b = ppl(&base.on_backend(b));
        assert!(
            ((ppl_b - ppl_cpu) / ppl_cpu).abs() < 1e-5,
            "{}: PPL {ppl_b} against the CPU's {ppl_cpu}",
            b.name()
        );
        let kld_b = kld(&base.on_backend(b), &variant.on_backend(b));
        assert!(
            scored() >= before + 4,
            "{}: the chunks were scored on the device",
            b.name()
        );
        let close = |what: &str, x: f64, y: f64, tol: f64| {
            assert!(
                ((x - y) / y.abs().max(1e-12)).abs() < tol,
                "{}: {what} {x} against the CPU's {y}",
                b.name()
            );
        };
        close("KLD", mean(&kld_b), mean(&kld_cpu), 1e-3);
        close(
            "KLD (full base)",
            kld_b.full_precision.kld.mean.value,
            kld_cpu.full_precision.kld.mean.value,
            1e-3,
        );
        close(
            "PPL(Q)",
            kld_b.stats.ppl.value,
            kld_cpu.stats.ppl.value,
            1e-5,
        );
        close(
            "PPL(base)",
            kld_b.stats.ppl_base.value,
            kld_cpu.stats.ppl_base.value,
            1e-5,
        );
        close(
            "same top",
            kld_b.stats.same_top.value,
            kld_cpu.stats.same_top.value,
            1e-9,
        );
        close(
            "same top (full base)",
            kld_b.full_precision.same_top.value,
            kld_cpu.full_precision.same_top.value,
            1e-9,
        );
    }
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

/// Largest |a − b| relative to the largest |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |e, (x, y)| e.max((x - y).abs()))
        / m.max(1e-30)
}

#[test]
fn the_forward_pass_on_the_device_gives_the_cpus_logits() {
    use crate::infer::{Logits, Model};
    use crate::model::fixture::{fixture_tensor_refs, FixtureSpec};
    let _ = gpu();
    let batches = || crate::infer::gpu::DEVICE_BATCHES.load(std::sync::atomic::Ordering::Relaxed);
    let before = batches();
    let specs = [
        ("llama", FixtureSpec::tiny_llama()),
        ("qwen2 (q/k/v biases)", FixtureSpec::tiny_qwen2()),
        ("mistral", FixtureSpec::tiny_mistral()),
        ("llama3 rope scaling", FixtureSpec::tiny_llama3_rope()),
    ];
    for (what, spec) in specs {
        let tensors = fixture_tensor_refs(&spec).expect("tensors");
        let cpu = Model::from_parts(std::path::Path::new("fixture"), &spec.config(), &tensors)
            .expect("model");
        let vocab = cpu.vocab_size() as u32;
        let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % vocab).collect();
        let next: Vec<u32> = (0..4).map(|i| (i * 11 + 3) % vocab).collect();
        let run = |m: &Model, switch: Option<&Model>| -> Vec<f32> {
            let mut cache = m.new_cache(40);
            let mut out = m.forward(&prompt, &mut cache, Logits::All).expect("prompt");
            // Decoding one token at a time, optionally on the other backend (the cache moves along).
            let d = switch.unwrap_or(m);
            for &t in &next {
                out.extend(d.forward(&[t], &mut cache, Logits::Last).expect("step"));
            }
            out
        };
        let want = run(&cpu, None);
        for b in OTHERS {
            let dev = cpu.on_backend(b);
            for (case, got) in [
                ("all on the device", run(&dev, None)),
                (
                    "prompt on the CPU, decoding on the device",
                    run(&cpu, Some(&dev)),
                ),
                (
                    "prompt on the device, decoding on the CPU",
                    run(&dev, Some(&cpu)),
                ),
            ] {
                let e = max_rel(&got, &want);
                assert!(
                    e < 1e-4,
                    "{} {what}, {case}: logits differ by {e:e}",
                    b.name()
                );
            }
        }
    }
    // 4 models × (1 + 4 + 1 + 4) device micro-batches, at least (other tests may add theirs).
    assert!(batches() - before >= 40, "the device path ran");
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

/// A GPTQ linear `[rows, cols]` with random codes, zero points and scales, act-order group indices.
fn gptq_tensor(bits: u32, rows: usize, cols: usize, group: usize, seed: u64) -> TensorRef {
    use crate::codecs::gptq::pack_gptq;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let maxq = (1u32 << bits) - 1;
    let groups = cols / group;
    let q: Vec<u8> = (0..rows * cols)
        .map(|_| rng.gen_range(0..=maxq) as u8)
        .collect();
    let zeros: Vec<u32> = (0..groups * rows)
        .map(|_| rng.gen_range(1..=maxq))
        .collect();
    let scales: Vec<f32> = (0..groups * rows)
        .map(|_| half::f16::from_f32(rng.gen_range(0.001..0.05)).to_f32())
        .collect();
    // Act-order: columns visit the groups in a shuffled order.
    let g_idx: Vec<u32> = (0..cols)
        .map(|c| ((c * 7 + 3) % cols / group) as u32)
        .collect();
    let p = pack_gptq(bits, rows, cols, &q, &zeros, &scales, &g_idx).expect("pack");
    crate::quantize_gptq::packed_tensor("w.gptq", bits, rows, cols, groups, &p).expect("tensor")
}

/// A grouped linear `[96, 256]` kept packed on the device (its stored bytes and at most a quarter more in
/// tables), dequantised there bit for bit as on the CPU, and multiplied as on the CPU at 1, 3 and 70 tokens.
fn grouped_matches_the_cpu(w: &TensorRef, what: &str, rng: &mut impl Rng) {
    let g = gpu();
    let dw = g.weight(w).expect("upload");
    let (device, stored) = (dw.device_bytes(), w.stored_bytes() as u64);
    assert!(
        device * 4 <= stored * 5 && device < (w.numel() * 2) as u64,
        "{what} is kept packed: {device} bytes on the device, {stored} stored"
    );
    let want = w.to_f32();
    let got = wgpu::weights::dequantize(g, w).expect("gpu dequantisation");
    let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(bad, 0, "{what}: {bad} weights differ from the CPU's");
    for n in [1usize, 3, 70] {
        let x = normal(rng, n * 256, 1.0);
        let mut cpu = vec![0.0f32; n * 96];
        Backend::Cpu.matmul(w, &x, n, &mut cpu);
        for b in OTHERS {
            let mut out = vec![f32::NAN; n * 96];
            b.matmul(w, &x, n, &mut out);
            let e = nmse(&out, &cpu);
            assert!(e < 1e-10, "{} {what}, {n} tokens: {e:e}", b.name());
        }
    }
    let gemm = |k: &wgpu::kernels::Key| matches!(k, wgpu::kernels::Key::Op(_, "gemm"));
    assert!(
        crate::backend::wgpu::lock(&g.pipelines).keys().any(gemm),
        "{what}: 70 tokens ran the grouped format's own GEMM"
    );
}

#[test]
fn gptq_linears_run_in_place_as_on_the_cpu() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for bits in [2u32, 3, 4, 8] {
        let w = gptq_tensor(bits, 96, 256, 64, u64::from(bits));
        grouped_matches_the_cpu(&w, &format!("GPTQ {bits}-bit"), &mut rng);
    }
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

#[test]
fn the_hessians_gram_matrix_agrees_with_the_cpu() {
    use crate::solvers::gptq::Hessian;
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for &(n, cols) in &[(1usize, 64usize), (70, 96), (300, 128)] {
        let x = normal(&mut rng, n * cols, 1.0);
        let mut cpu = Hessian::new(cols);
        cpu.add_batch(&x, n).expect("cpu");
        cpu.add_batch(&x[..cols], 1).expect("cpu");
        let mut dev = Hessian::new(cols);
        dev.add_gram(&g.gram(&x, n, cols).expect("gram"), n)
            .expect("gpu");
        dev.add_gram(&g.gram(&x[..cols], 1, cols).expect("gram"), 1)
            .expect("gpu");
        let (a, b): (Vec<f32>, Vec<f32>) = dev
            .matrix()
            .iter()
            .zip(cpu.matrix())
            .map(|(&a, &b)| (a as f32, b as f32))
            .unzip();
        assert_eq!(dev.nsamples(), cpu.nsamples());
        let e = nmse(&a, &b);
        assert!(e < 1e-10, "{n} rows × {cols}: normalised error {e:e}");
    }
}

#[test]
fn gptq_on_the_device_makes_the_cpus_layers() {
    use crate::calib::{CalibOptions, CalibSource};
    use crate::model::fixture::{write_fixture, FixtureSpec};
    use crate::model::SourceModel;
    use crate::quantize_gptq::{quantize_gptq, GptqQuantizeOptions};
    use crate::solvers::gptq::GptqOptions;
    let _ = gpu();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    let text = tmp.path().join("calib.txt");
    std::fs::write(&text, crate::eval::perplexity::tests::TEXT.repeat(20)).expect("text");
    let opts = |backend| GptqQuantizeOptions {
        solver: GptqOptions {
            bits: 4,
            group_size: Some(32),
            act_order: true,
            ..GptqOptions::default()
        },
        calib: CalibSource::File {
            path: text.clone(),
            column: None,
        },
        calib_opts: CalibOptions {
            rows: 8,
            seq_len: 48,
            seed: 3,
        },
        max_shard_bytes: None,
        backend,
        ..GptqQuantizeOptions::default()
    };
    let run = |b: Backend| {
        let out = tmp.path().join(b.name());
        let r = quantize_gptq(
            &src,
            &opts(b),
            &crate::output::OutputSpec::folder(&out),
            &mut |_, _, _| true,
        )
        .expect("gptq");
        let m = SourceModel::open(&out).expect("open");
        let w: Vec<Vec<f32>> = m
            .tensors
            .values()
            .filter(|t| t.is_grouped())
            .map(TensorRef::to_f32)
            .collect();
        let loss: f64 = r.modules.iter().map(|m| m.gptq_output_loss).sum();
        (w, loss)
    };
    let (cw, closs) = run(Backend::Cpu);
    for b in OTHERS {
        let (gw, gloss) = run(b);
        assert_eq!(gw.len(), 14);
        for (g, c) in gw.iter().zip(&cw) {
            let e = nmse(g, c);
            assert!(
                e < 1e-3,
                "{}: a GPTQ layer differs from the CPU's by {e:e}",
                b.name()
            );
        }
        assert!(
            (gloss - closs).abs() <= 0.02 * closs,
            "{}: GPTQ loss {gloss} against the CPU's {closs}",
            b.name()
        );
    }
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

/// An AutoAWQ GEMM linear `[rows, cols]` with random codes, zero points and scales.
fn awq_tensor(rows: usize, cols: usize, group: usize, seed: u64) -> TensorRef {
    use crate::codecs::awq::pack_interleaved;
    use crate::tensor::{AwqLinear, Grouped};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let groups = cols / group;
    // Stored [in, out]: codes q[c][r], zeros [groups][r], scales [groups][r].
    let q: Vec<u8> = (0..cols * rows).map(|_| rng.gen_range(0..16)).collect();
    let z: Vec<u8> = (0..groups * rows).map(|_| rng.gen_range(0..16)).collect();
    let s: Vec<u8> = (0..groups * rows)
        .flat_map(|_| half::f16::from_f32(rng.gen_range(0.001..0.05)).to_le_bytes())
        .collect();
    TensorRef::grouped(
        "w.awq",
        Grouped::Awq(AwqLinear {
            in_features: cols,
            out_features: rows,
            group_size: group,
            qweight: Bytes::owned(pack_interleaved(&q, cols, rows)),
            qzeros: Bytes::owned(pack_interleaved(&z, groups, rows)),
            scales: Bytes::owned(s),
        }),
    )
    .expect("tensor")
}

#[test]
fn awq_linears_run_in_place_as_on_the_cpu() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for group in [32usize, 128] {
        let w = awq_tensor(96, 256, group, group as u64);
        grouped_matches_the_cpu(&w, &format!("AWQ g{group}"), &mut rng);
    }
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

/// `t` quantized by a packed-format packer (its grouped linear).
fn packed_by(
    packer: &dyn crate::writers::packed::LinearPacker,
    t: &TensorRef,
) -> crate::tensor::Grouped {
    packer.pack(t).expect("pack").1
}

fn source_96x256(seed: u64) -> TensorRef {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    TensorRef::from_f32("w", vec![96, 256], &normal(&mut rng, 96 * 256, 0.02)).expect("tensor")
}

fn grouped(name: &str, g: crate::tensor::Grouped) -> TensorRef {
    TensorRef::grouped(name, g).expect("tensor")
}

/// `bytes` (little-endian f16 values) re-encoded as `to`'s values.
fn f16_bytes_as(bytes: &[u8], to: GgmlType) -> Vec<u8> {
    bytes
        .chunks_exact(2)
        .flat_map(|c| {
            let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32() * 1.37;
            match to {
                GgmlType::F32 => v.to_le_bytes().to_vec(),
                GgmlType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                _ => half::f16::from_f32(v).to_le_bytes().to_vec(),
            }
        })
        .collect()
}

#[test]
fn bitsandbytes_nf4_and_fp4_run_in_place_as_on_the_cpu() {
    use crate::codecs::bnb::{Bnb4Dtype, Bnb4Kind};
    use crate::tensor::Grouped;
    use crate::writers::bnb::Bnb4Options;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let src = source_96x256(17);
    for kind in [Bnb4Kind::Nf4, Bnb4Kind::Fp4] {
        for double_quant in [false, true] {
            let Grouped::Bnb4(mut p) = packed_by(&Bnb4Options { kind, double_quant }, &src) else {
                panic!("bitsandbytes packs Bnb4")
            };
            for dtype in [Bnb4Dtype::F16, Bnb4Dtype::BF16, Bnb4Dtype::F32] {
                p.dtype = dtype;
                let q = Grouped::Bnb4(p.clone());
                let what = format!("{kind:?} dq={double_quant} {dtype:?}");
                grouped_matches_the_cpu(&grouped("w.bnb", q), &what, &mut rng);
            }
        }
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn hqq_linears_run_in_place_as_on_the_cpu() {
    use crate::codecs::hqq::{HqqDtype, HqqParams};
    use crate::tensor::Grouped;
    use crate::writers::hqq::HqqOptions;
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let src = source_96x256(18);
    let cases = [
        (8u8, 64usize, 1u8),
        (4, 64, 1),
        (3, 64, 1),
        (2, 32, 1),
        (1, 64, 1),
        (4, 64, 0),
        (3, 128, 0),
    ];
    for (nbits, group, axis) in cases {
        let params = HqqParams::new(nbits, group, axis);
        let Grouped::Hqq(mut p) = packed_by(
            &HqqOptions {
                params,
                backend: Backend::Cpu,
            },
            &src,
        ) else {
            panic!("HQQ packs Hqq")
        };
        let what = format!("HQQ {nbits}-bit g{group} axis {axis}");
        grouped_matches_the_cpu(&grouped("w.hqq", Grouped::Hqq(p.clone())), &what, &mut rng);
        if nbits == 4 {
            for (dtype, ty) in [
                (HqqDtype::BF16, GgmlType::BF16),
                (HqqDtype::F32, GgmlType::F32),
            ] {
                p.scale = Bytes::owned(f16_bytes_as(&p.scale, ty));
                p.zero = Bytes::owned(f16_bytes_as(&p.zero, ty));
                p.dtype = dtype;
                let q = Grouped::Hqq(p.clone());
                grouped_matches_the_cpu(
                    &grouped("w.hqq", q),
                    &format!("{what} {dtype:?}"),
                    &mut rng,
                );
                let Grouped::Hqq(again) = packed_by(
                    &HqqOptions {
                        params,
                        backend: Backend::Cpu,
                    },
                    &src,
                ) else {
                    unreachable!()
                };
                p = again;
            }
        }
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn hqqs_solver_on_the_device_agrees_with_the_cpu() {
    use crate::codecs::hqq::{quantize, HqqParams, HqqQuantized};
    use crate::tensor::Grouped;
    use crate::writers::hqq::HqqOptions;
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    // Heavy-tailed weights as real linears have: a normal body with a few large values.
    let (rows, cols) = (192usize, 512usize);
    let w: Vec<f32> = normal(&mut rng, rows * cols, 0.02)
        .into_iter()
        .enumerate()
        .map(|(i, x)| if i % 997 == 0 { x * 8.0 } else { x })
        .collect();
    let err = |q: &HqqQuantized, p: &HqqParams| -> f64 {
        let (_, gcols) = p.grouped_dims(w.len());
        w.iter()
            .enumerate()
            .map(|(i, &x)| {
                let grp = if p.axis == 1 {
                    i / p.group_size
                } else {
                    i % gcols
                };
                let d = (f32::from(q.codes[i]) - q.zero[grp]) * q.scale[grp];
                f64::from((x - d).abs())
            })
            .sum()
    };
    for (nbits, group, axis) in [
        (4u8, 64usize, 1u8),
        (3, 64, 0),
        (2, 32, 1),
        (8, 128, 1),
        (1, 64, 1),
    ] {
        let p = HqqParams::new(nbits, group, axis);
        let what = format!("HQQ {nbits}-bit g{group} axis {axis}");
        let cpu = quantize(&w, &p);
        let dev = g.hqq_quantize(&w, &p).expect("solve on the device");
        let same = cpu
            .codes
            .iter()
            .zip(&dev.codes)
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            same as f64 >= 0.9995 * w.len() as f64,
            "{what}: {} of {} codes differ",
            w.len() - same,
            w.len()
        );
        let zeros = cpu
            .zero
            .iter()
            .zip(&dev.zero)
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            zeros as f64 >= 0.995 * cpu.zero.len() as f64,
            "{what}: {zeros} of {} f16 zeros equal",
            cpu.zero.len()
        );
        assert_eq!(cpu.scale, dev.scale, "{what}: the scales are the CPU's");
        let (a, b) = (err(&cpu, &p), err(&dev, &p));
        assert!(
            (a - b).abs() <= 1e-4 * a,
            "{what}: error {b} on the device vs {a}"
        );
        let rtn = quantize(
            &w,
            &HqqParams {
                optimize: false,
                ..p
            },
        );
        assert!(
            b < err(&rtn, &p),
            "{what}: the device's solve beats plain rounding"
        );
    }
    // The writer takes the device's solve with the GPU backend.
    let before = crate::backend::wgpu::hqq_solved_on_device();
    let src = source_96x256(5);
    let params = HqqParams::new(4, 64, 1);
    let Grouped::Hqq(_) = packed_by(
        &HqqOptions {
            params,
            backend: Backend::Gpu,
        },
        &src,
    ) else {
        panic!("HQQ packs Hqq")
    };
    assert!(
        crate::backend::wgpu::hqq_solved_on_device() > before,
        "the writer solved on the device"
    );
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn compressed_tensors_linears_run_in_place_as_on_the_cpu() {
    use crate::codecs::ct::{pack_rows, ScaleType};
    use crate::tensor::{CtLinear, Grouped};
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let (rows, cols) = (96usize, 256usize);
    for (bits, group, asym, act_order, st) in [
        (4u32, 128usize, false, false, ScaleType::BF16),
        (4, 32, true, true, ScaleType::F16),
        (3, 64, true, false, ScaleType::F32),
        (8, 256, false, true, ScaleType::F16),
        (2, 64, true, false, ScaleType::BF16),
    ] {
        let groups = cols / group;
        let max = (1u32 << bits) - 1;
        let q: Vec<u8> = (0..rows * cols)
            .map(|_| rng.gen_range(0..=max) as u8)
            .collect();
        let scale: Vec<u8> = (0..rows * groups)
            .flat_map(|_| {
                let v = rng.gen_range(0.001f32..0.05);
                match st {
                    ScaleType::F32 => v.to_le_bytes().to_vec(),
                    ScaleType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                    ScaleType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                }
            })
            .collect();
        // Zero points [⌈rows·bits/32⌉, groups]: packed down the output dimension, per group.
        let zero_point = asym.then(|| {
            let z: Vec<u8> = (0..groups * rows)
                .map(|_| rng.gen_range(0..=max) as u8)
                .collect();
            let packed = pack_rows(&z, groups, rows, bits);
            // pack_rows gives [groups, words]; the layout wants [words, groups].
            let words = packed.len() / 4 / groups;
            let w: Vec<u32> = packed
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut t = vec![0u32; words * groups];
            for g in 0..groups {
                for i in 0..words {
                    t[i * groups + g] = w[g * words + i];
                }
            }
            Bytes::owned(t.iter().flat_map(|x| x.to_le_bytes()).collect())
        });
        let g_idx = act_order.then(|| {
            Bytes::owned(
                (0..cols)
                    .flat_map(|c| (((c * 5 + 1) % cols / group) as i32).to_le_bytes())
                    .collect(),
            )
        });
        let w = grouped(
            "w.ct",
            Grouped::Ct(CtLinear {
                bits,
                in_features: cols,
                out_features: rows,
                group_size: group,
                packed: Bytes::owned(pack_rows(&q, rows, cols, bits)),
                scale: Bytes::owned(scale),
                scale_type: st,
                zero_point,
                g_idx,
            }),
        );
        let what = format!(
            "compressed-tensors int{bits} g{group} asym={asym} act_order={act_order} {st:?}"
        );
        grouped_matches_the_cpu(&w, &what, &mut rng);
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn exl2_linears_run_in_place_as_on_the_cpu() {
    use crate::codecs::exl2::pack_exl2;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (rows, cols) = (96usize, 256usize);
    for group_rows in [
        vec![(8u8, 32usize), (6, 32), (5, 32), (4, 64), (3, 32), (2, 64)],
        vec![(4u8, 256usize)],
    ] {
        let codes: Vec<u8> = group_rows
            .iter()
            .flat_map(|&(b, r)| {
                (0..r * rows)
                    .map(|_| rng.gen_range(0..1u32 << b) as u8)
                    .collect::<Vec<_>>()
            })
            .collect();
        let scale_codes: Vec<u8> = (0..group_rows.len() * rows)
            .map(|_| rng.gen_range(1..=16))
            .collect();
        let scale_max: Vec<half::f16> = group_rows
            .iter()
            .map(|_| half::f16::from_f32(rng.gen_range(0.01..0.3)))
            .collect();
        let mut perm: Vec<u32> = (0..cols as u32).collect();
        for i in (1..cols).rev() {
            perm.swap(i, rng.gen_range(0..=i));
        }
        let p =
            pack_exl2(rows, &group_rows, &codes, &scale_codes, &scale_max, &perm).expect("pack");
        let w = crate::quantize_exl2::exl2_tensor("w.exl2", &p, rows).expect("tensor");
        grouped_matches_the_cpu(&w, &format!("EXL2 {group_rows:?}"), &mut rng);
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn gptq_lazy_batch_updates_on_the_device_agree_with_the_cpu() {
    use crate::solvers::gptq::{gptq_quantize, GptqOptions, Hessian, DEVICE_ROWS_CAP};
    let _ = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let (rows, cols, n) = (80usize, 320usize, 400usize);
    let w = normal(&mut rng, rows * cols, 0.05);
    // Correlated inputs: a shared component per token plus noise.
    let mut x = normal(&mut rng, n * cols, 1.0);
    for t in 0..n {
        let common = x[t * cols];
        for c in 1..cols {
            x[t * cols + c] += 0.7 * common;
        }
    }
    let mut h = Hessian::new(cols);
    h.add_batch(&x, n).expect("hessian");
    // Two device chunks of rows (the sweep's own chunks are 16 rows here).
    DEVICE_ROWS_CAP.store(48, std::sync::atomic::Ordering::Relaxed);
    let cases = [
        (4u8, Some(32usize), true, false, 128usize),
        (4, Some(256), false, false, 128),
        (3, Some(64), true, true, 64),
        (2, None, false, false, 100),
        (8, Some(128), true, false, 128),
    ];
    for (bits, group_size, act_order, static_groups, block_size) in cases {
        let o = |backend| GptqOptions {
            bits,
            group_size,
            act_order,
            static_groups,
            block_size,
            backend,
            ..GptqOptions::default()
        };
        let cpu = gptq_quantize(&w, rows, cols, &h, &o(Backend::Cpu)).expect("cpu");
        let dev = gptq_quantize(&w, rows, cols, &h, &o(Backend::Gpu)).expect("gpu");
        let what = format!("{bits}-bit g{group_size:?} act_order={act_order} static={static_groups} block {block_size}");
        let same = cpu.q.iter().zip(&dev.q).filter(|(a, b)| a == b).count();
        assert!(
            same * 1000 >= cpu.q.len() * 995,
            "{what}: {} of {} codes differ",
            cpu.q.len() - same,
            cpu.q.len()
        );
        let rel = (dev.loss - cpu.loss).abs() / cpu.loss;
        assert!(
            rel < 2e-3,
            "{what}: loss {} on the GPU, {} on the CPU",
            dev.loss,
            cpu.loss
        );
        assert!(
            dev.loss < dev.rtn_loss,
            "{what}: GPTQ beats round-to-nearest"
        );
        assert_eq!(cpu.g_idx, dev.g_idx, "{what}");
    }
    DEVICE_ROWS_CAP.store(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

#[test]
fn a_cache_filled_on_the_device_only_serves_the_cpu_and_clones() {
    use crate::infer::{Logits, Model};
    use crate::model::fixture::{fixture_tensor_refs, FixtureSpec};
    let _ = gpu();
    let spec = FixtureSpec::tiny_llama();
    let tensors = fixture_tensor_refs(&spec).expect("tensors");
    let cpu = Model::from_parts(std::path::Path::new("fixture"), &spec.config(), &tensors)
        .expect("model");
    let vocab = cpu.vocab_size() as u32;
    let prompt: Vec<u32> = (0..20).map(|i| (i * 29 + 7) % vocab).collect();
    let next: Vec<u32> = vec![3, 9, 4];
    let mut want_cache = cpu.new_cache(32);
    cpu.forward(&prompt, &mut want_cache, Logits::None)
        .expect("cpu prompt");
    let want = cpu
        .forward(&next, &mut want_cache, Logits::All)
        .expect("cpu next");
    for b in OTHERS {
        let dev = cpu.on_backend(b);
        let mut cache = dev.new_cache(32);
        // Two positions through the ordinary path (read back), then the rest only on the device.
        dev.forward(&prompt[..2], &mut cache, Logits::None)
            .expect("prefix");
        let kept = dev
            .logits_on_device(&prompt[2..], &mut cache, 6)
            .expect("device logits");
        drop(kept);
        assert_eq!((cache.len(), cache.host_len), (20, 2));
        let clone = cache.clone();
        assert_eq!(clone.len(), 2, "a clone keeps the positions the host holds");
        let got = cpu
            .forward(&next, &mut cache, Logits::All)
            .expect("cpu after device");
        let e = max_rel(&got, &want);
        assert!(
            e < 1e-4,
            "{}: the CPU continued a device-filled cache: {e:e}",
            b.name()
        );
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn importance_matrices_are_summed_on_the_device_as_on_the_cpu() {
    use crate::eval::perplexity::tests::{fixture_model, TEXT};
    use crate::imatrix::{compute_imatrix, ImatrixOptions};
    let _ = gpu();
    let (model, tok) = fixture_model(3);
    let text = TEXT.repeat(3);
    let opts = ImatrixOptions {
        n_ctx: 64,
        max_chunks: Some(3),
        ..ImatrixOptions::default()
    };
    let run = |m: &crate::infer::Model| {
        compute_imatrix(m, &tok, &text, "t", &opts, &mut |_, _| true).expect("imatrix")
    };
    let cpu = run(&model);
    let batches = || crate::infer::gpu::DEVICE_BATCHES.load(std::sync::atomic::Ordering::Relaxed);
    for b in OTHERS {
        let before = batches();
        let dev = run(&model.on_backend(b));
        assert!(
            batches() >= before + 3,
            "{}: the chunks ran on the device",
            b.name()
        );
        assert_eq!(dev.chunk_count, cpu.chunk_count);
        assert_eq!(
            dev.entries.keys().collect::<Vec<_>>(),
            cpu.entries.keys().collect::<Vec<_>>()
        );
        for (name, e) in &cpu.entries {
            let d = &dev.entries[name];
            assert_eq!(d.counts, e.counts, "{name}");
            let e2 = nmse(&d.sums, &e.sums);
            assert!(e2 < 1e-10, "{}: {name} sums differ: {e2:e}", b.name());
        }
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

/// A finite f32 with any exponent (subnormals and zeros included).
fn any_finite(rng: &mut impl Rng) -> f32 {
    loop {
        let b: u32 = rng.gen();
        let v = f32::from_bits(b);
        if v.is_finite() {
            return v;
        }
    }
}

#[test]
fn exact_arithmetic_on_the_device_rounds_as_ieee() {
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut pairs: Vec<(f32, f32)> = Vec::new();
    for _ in 0..20000 {
        pairs.push((any_finite(&mut rng), any_finite(&mut rng)));
    }
    for _ in 0..20000 {
        // Ordinary magnitudes, near each other (cancellation), and subnormal neighbourhoods.
        let a: f32 = rng.gen_range(-100.0..100.0);
        let b = match rng.gen_range(0..4) {
            0 => rng.gen_range(-100.0..100.0),
            1 => -a * (1.0 + rng.gen_range(-1e-6..1e-6)),
            2 => f32::from_bits(rng.gen_range(0..0x0100_0000u32)),
            _ => (rng.gen_range(-64i32..64) as f32) * 0.5,
        };
        pairs.push((a, b));
        pairs.push((f32::from_bits(rng.gen_range(0..0x0200_0000u32)), b));
    }
    // Ties: (1 + k·2⁻²³)² and halves, exact zeros of both signs, extremes.
    for k in 0..512u32 {
        let a = f32::from_bits(0x3f80_0000 + k);
        pairs.push((a, a));
        pairs.push((a, -a));
        pairs.push((f32::from_bits(0x3f80_0000 + (k << 12)), 0.5));
    }
    for &(a, b) in &[
        (0.0f32, -0.0f32),
        (-0.0, -0.0),
        (-0.0, 0.0),
        (f32::MAX, 2.0),
        (f32::MIN_POSITIVE, 0.5),
        (1e-45, 1e-45),
        (3.0, 1e-45),
    ] {
        pairs.push((a, b));
    }
    let got = g.exact_ops(&pairs).expect("exact arithmetic");
    let mut bad = 0;
    for (&(a, b), r) in pairs.iter().zip(&got) {
        let want = [
            (a * b).to_bits(),
            if b == 0.0 { 0 } else { (a / b).to_bits() },
            (a + b).to_bits(),
            (a - b).to_bits(),
            u32::from(a < b),
        ];
        if *r != want {
            bad += 1;
            assert!(
                bad < 10,
                "{a:e} ({:08x}), {b:e} ({:08x}): device {r:08x?}, IEEE {want:08x?}",
                a.to_bits(),
                b.to_bits()
            );
        }
    }
    assert_eq!(bad, 0, "{bad} of {} pairs differ", pairs.len());
}

#[test]
fn the_gpu_quantizes_the_legacy_types_byte_for_byte_as_the_cpu() {
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    let cols = 256usize;
    let mut rows: Vec<Vec<f32>> = vec![
        normal(&mut rng, cols, 0.02),
        normal(&mut rng, cols, 3.0),
        vec![0.0; cols],
        // Subnormals, signed zeros and one large value per block.
        (0..cols)
            .map(|i| match i % 4 {
                0 => f32::from_bits(rng.gen_range(0..0x0080_0000u32)),
                1 => -0.0,
                2 => any_finite(&mut rng) * 1e-30,
                _ => rng.gen_range(-1.0..1.0),
            })
            .collect(),
        // Halfway points: multiples of d/2 for a block maximum of 8 (Q4_0's d = −1), of 16 and 127.
        (0..cols)
            .map(|i| {
                if i % 32 == 0 {
                    -8.0
                } else {
                    (rng.gen_range(-16i32..16) as f32) * 0.5
                }
            })
            .collect(),
        (0..cols)
            .map(|i| {
                if i % 32 == 0 {
                    127.0
                } else {
                    (rng.gen_range(-254i32..254) as f32) * 0.5
                }
            })
            .collect(),
        (0..cols)
            .map(|i| {
                if i % 32 == 0 {
                    -16.0
                } else {
                    (rng.gen_range(-32i32..32) as f32) * 0.5
                }
            })
            .collect(),
        // A constant block (max − min = 0).
        vec![0.75; cols],
    ];
    for _ in 0..8 {
        rows.push((0..cols).map(|_| any_finite(&mut rng) * 1e-36).collect());
    }
    let x: Vec<f32> = rows.concat();
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        assert!(wgpu::kernels::gpu_quantizes(ty));
        let tr = ty.traits();
        let rb = tr.block_bytes * cols / tr.block_elems;
        let mut want = vec![0u8; rows.len() * rb];
        for (r, dst) in want.chunks_exact_mut(rb).enumerate() {
            ty.quantize(&x[r * cols..(r + 1) * cols], dst, None);
        }
        // An odd number of blocks too (the last invocation writes one of two).
        for n in [x.len(), x.len() - 32] {
            let got = g.quantize_blocks(ty, &x[..n]).expect("quantize");
            let w = &want[..n / 32 * tr.block_bytes];
            let bad = got.iter().zip(w).filter(|(a, b)| a != b).count();
            assert_eq!(got.len(), w.len(), "{}", tr.name);
            assert_eq!(bad, 0, "{}: {bad} bytes differ from the CPU's", tr.name);
        }
    }
}

#[test]
fn a_q8_0_gguf_quantized_on_the_device_is_the_cpus_file() {
    use crate::model::fixture::{write_fixture, FixtureSpec};
    use crate::model::SourceModel;
    use crate::quantize::{quantize_gguf, GgufQuantizeOptions};
    let _ = gpu();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    for mix in ["q8_0", "q4_0", "q5_1"] {
        let mut files = Vec::new();
        for backend in [Backend::Cpu, Backend::Gpu] {
            let out = tmp.path().join(format!("{mix}-{}.gguf", backend.name()));
            let opts = GgufQuantizeOptions {
                mix: crate::recipes::parse_mix(mix).expect("mix"),
                overrides: Vec::new(),
                imatrix: None,
                backend,
            };
            let spec = crate::output::OutputSpec::new(&out, crate::output::OutputKind::File);
            let before =
                wgpu::quant::QUANTIZED_ON_DEVICE.load(std::sync::atomic::Ordering::Relaxed);
            quantize_gguf(&src, &opts, &spec, &mut |_, _, _| true).expect("quantize");
            let after = wgpu::quant::QUANTIZED_ON_DEVICE.load(std::sync::atomic::Ordering::Relaxed);
            if backend == Backend::Gpu {
                assert!(
                    after > before,
                    "{mix}: tensors were quantized on the device"
                );
            }
            files.push(std::fs::read(&out).expect("read"));
        }
        assert!(
            files[0] == files[1],
            "{mix}: the GPU's file differs from the CPU's"
        );
    }
    assert_eq!(crate::backend::gpu_fallback(), None);
}

#[test]
fn exl2_lazy_batch_updates_on_the_device_agree_with_the_cpu() {
    use crate::solvers::exl2::{Exl2Prepared, QParams};
    use crate::solvers::gptq::Hessian;
    let _ = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let (n, k, t) = (72usize, 256usize, 400usize);
    let w = normal(&mut rng, n * k, 0.05);
    let mut x = normal(&mut rng, t * k, 1.0);
    for r in 0..t {
        let common = x[r * k];
        for c in 1..k {
            x[r * k + c] += 0.6 * common;
        }
    }
    let mut h = Hessian::new(k);
    h.add_batch(&x, t).expect("hessian");
    for parts in [
        vec![(4u8, 1.0f64, 128usize)],
        vec![(8u8, 0.1, 32), (4, 0.4, 64), (3, 0.5, 64)],
        vec![(6u8, 0.25, 32), (2, 0.75, 32)],
    ] {
        let qp = QParams { parts };
        let cpu = Exl2Prepared::new(&h)
            .expect("prep")
            .quantize(&w, n, &qp)
            .expect("cpu");
        let dev = Exl2Prepared::new(&h)
            .expect("prep")
            .on_backend(Backend::Gpu)
            .quantize(&w, n, &qp)
            .expect("gpu");
        let what = qp.desc();
        let (a, b) = (&cpu.packed.q_weight, &dev.packed.q_weight);
        let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
        assert!(
            same * 100 >= a.len() * 97,
            "{what}: {} of {} code bytes differ",
            a.len() - same,
            a.len()
        );
        let e = nmse(&dev.dequantised, &cpu.dequantised);
        assert!(e < 1e-4, "{what}: the dequantised weights differ by {e:e}");
        let (ew, ec) = (nmse(&dev.dequantised, &w), nmse(&cpu.dequantised, &w));
        assert!(
            (ew - ec).abs() < 0.02 * ec,
            "{what}: weight error {ew:e} on the GPU, {ec:e} on the CPU"
        );
    }
    assert_eq!(
        crate::backend::gpu_fallback(),
        None,
        "no call fell back to the CPU"
    );
}

#[test]
fn decoding_on_the_device_reuses_its_buffers() {
    use crate::infer::{Logits, Model};
    use crate::model::fixture::{fixture_tensor_refs, FixtureSpec};
    let _ = gpu();
    let spec = FixtureSpec::tiny_llama();
    let tensors = fixture_tensor_refs(&spec).expect("tensors");
    let m = Model::from_parts(std::path::Path::new("fixture"), &spec.config(), &tensors)
        .expect("model")
        .on_backend(Backend::Gpu);
    let mut cache = m.new_cache(64);
    m.forward(&[1, 2, 3, 4, 5], &mut cache, Logits::Last)
        .expect("prompt");
    for t in [6u32, 7] {
        m.forward(&[t], &mut cache, Logits::Last).expect("warm-up");
    }
    let misses = || wgpu::POOL_MISSES.with(std::cell::Cell::get);
    let submissions = || wgpu::SUBMISSIONS.with(std::cell::Cell::get);
    let (before, submitted) = (misses(), submissions());
    for t in [8u32, 9, 10, 11] {
        m.forward(&[t], &mut cache, Logits::Last).expect("decode");
    }
    assert_eq!(
        misses(),
        before,
        "decoding a token took every buffer from the pool"
    );
    assert_eq!(
        submissions() - submitted,
        4,
        "each decoded token is one submission (layers, logits and the K/V rows read back together)"
    );
    // A decoded token reuses the bind groups of the tokens before: some run of four tokens creates none
    // (another test freeing device arrays meanwhile empties the cache, so a run may miss).
    let binds = || wgpu::BIND_GROUPS.with(std::cell::Cell::get);
    let reused = (0..8u32).any(|w| {
        let bound = binds();
        for i in 0..4 {
            m.forward(&[20 + 4 * w + i], &mut cache, Logits::Last)
                .expect("decode");
        }
        binds() == bound
    });
    assert!(reused, "decoding reuses its bind groups");
    // The host copy of the cache kept up: a CPU step from here gives the GPU's logits.
    let mut host = cache.clone();
    assert_eq!(host.len(), cache.len(), "every position was read back");
    let on_cpu = m.on_backend(Backend::Cpu);
    let a = on_cpu
        .forward(&[12], &mut host, Logits::Last)
        .expect("cpu step");
    let b = m
        .forward(&[12], &mut cache, Logits::Last)
        .expect("gpu step");
    assert!(
        max_rel(&a, &b) < 1e-4,
        "CPU and GPU steps from the same cache"
    );
    // Dropping the cache frees its device arrays: the bind cache lets go of them before its next use.
    let g = gpu();
    let frees = g.frees.load(std::sync::atomic::Ordering::Relaxed);
    drop(cache);
    assert!(
        g.frees.load(std::sync::atomic::Ordering::Relaxed) > frees,
        "the KV cache's arrays count as freed"
    );
    assert_eq!(crate::backend::gpu_fallback(), None);
}
